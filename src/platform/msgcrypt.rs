//! The AES scheme shared by DingTalk HTTP callbacks and WeCom callbacks (PROTOCOLS.md §0),
//! known from the vendors' `WXBizMsgCrypt` libraries. Only the envelope around it differs
//! between the two platforms, so it lives here once.
//!
//! Plaintext before padding: 16 random bytes, the message length as a big-endian u32, the
//! message, the receiver id. Padding is PKCS#7 with a block size of 32 (not 16). AES-256-CBC,
//! key = base64(EncodingAESKey + "="), IV = first 16 bytes of the key. The signature is the
//! SHA-1 of the sorted token, timestamp, nonce and ciphertext.

use aes::cipher::{block_padding::NoPadding, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// The padding block size of this scheme: 32, not AES's 16.
const PAD_BLOCK: usize = 32;
const RANDOM_LEN: usize = 16;
const HEADER_LEN: usize = RANDOM_LEN + 4;

/// The EncodingAESKey is not 43 characters of `[A-Za-z0-9]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the EncodingAESKey must be 43 characters of [A-Za-z0-9]")]
pub struct KeyError;

/// Why a ciphertext was refused. Each variant is a distinct metric label and error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("ciphertext is not valid base64")]
    Base64,
    #[error("ciphertext length {0} is not a positive multiple of the AES block size")]
    CiphertextLength(usize),
    #[error("padding byte {0} is outside 1..=32 or longer than the plaintext")]
    Padding(u8),
    #[error("plaintext is too short to hold the random prefix and length")]
    Truncated,
    #[error("length prefix {declared} exceeds the {available} bytes available")]
    Length { declared: u32, available: usize },
    #[error("receiver id does not match the configured one")]
    ReceiverMismatch,
}

impl DecryptError {
    /// Short stable code, used in error replies and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            DecryptError::Base64 => "invalid_base64",
            DecryptError::CiphertextLength(_) => "invalid_ciphertext_length",
            DecryptError::Padding(_) => "invalid_padding",
            DecryptError::Truncated => "truncated_plaintext",
            DecryptError::Length { .. } => "invalid_length_prefix",
            DecryptError::ReceiverMismatch => "receiver_mismatch",
        }
    }
}

/// A decrypted message with the random prefix it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decrypted {
    pub random: [u8; RANDOM_LEN],
    pub message: Vec<u8>,
}

/// Credentials of one callback registration: token, AES key and receiver id.
#[derive(Clone)]
pub struct MsgCrypt {
    token: String,
    /// As configured: a callback registration hands it to the platform as it is.
    encoding_aes_key: String,
    key: [u8; 32],
    receiver_id: String,
}

impl std::fmt::Debug for MsgCrypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgCrypt")
            .field("receiver_id", &self.receiver_id)
            .finish_non_exhaustive()
    }
}

impl MsgCrypt {
    pub fn new(token: &str, encoding_aes_key: &str, receiver_id: &str) -> Result<Self, KeyError> {
        if encoding_aes_key.len() != 43
            || !encoding_aes_key.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(KeyError);
        }
        // 43 base64 characters carry 258 bits; the last 2 must be zero for the standard
        // (canonical) decoder. Vendor keys are generated that way, but a hand-made key may not
        // be, and the vendor libraries decode it anyway, so decode leniently.
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        );
        let bytes = engine
            .decode(format!("{encoding_aes_key}="))
            .map_err(|_| KeyError)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError)?;
        Ok(MsgCrypt {
            token: token.to_owned(),
            encoding_aes_key: encoding_aes_key.to_owned(),
            key,
            receiver_id: receiver_id.to_owned(),
        })
    }

    pub fn receiver_id(&self) -> &str {
        &self.receiver_id
    }

    /// The token, for registering the callback with the platform.
    pub fn token(&self) -> Secret {
        Secret::new(self.token.as_str())
    }

    /// The EncodingAESKey as configured, for registering the callback with the platform.
    pub fn encoding_aes_key(&self) -> Secret {
        Secret::new(self.encoding_aes_key.as_str())
    }

    fn iv(&self) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&self.key[..16]);
        iv
    }

    /// `msg_signature`: SHA-1 over the lexicographically sorted token, timestamp, nonce and
    /// ciphertext, as 40 lowercase hex characters.
    pub fn signature(&self, timestamp: &str, nonce: &str, encrypt: &str) -> String {
        let mut parts = [self.token.as_str(), timestamp, nonce, encrypt];
        parts.sort_unstable();
        let mut sha = Sha1::new();
        for p in parts {
            sha.update(p.as_bytes());
        }
        hex::encode(sha.finalize())
    }

    /// Checks a signature in constant time. Case-insensitive, since it is hex.
    pub fn verify(&self, signature: &str, timestamp: &str, nonce: &str, encrypt: &str) -> bool {
        let expected = self.signature(timestamp, nonce, encrypt);
        let given = signature.to_ascii_lowercase();
        expected.as_bytes().ct_eq(given.as_bytes()).into()
    }

    /// Encrypts `message` with the given random prefix; returns standard base64.
    pub fn encrypt(&self, random: &[u8; RANDOM_LEN], message: &[u8]) -> String {
        let len = u32::try_from(message.len()).expect("message longer than 4 GiB");
        let unpadded = HEADER_LEN + message.len() + self.receiver_id.len();
        let pad = PAD_BLOCK - unpadded % PAD_BLOCK;
        let mut buf = Vec::with_capacity(unpadded + pad);
        buf.extend_from_slice(random);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(message);
        buf.extend_from_slice(self.receiver_id.as_bytes());
        buf.resize(unpadded + pad, pad as u8);
        let n = buf.len();
        Aes256CbcEnc::new(&self.key.into(), &self.iv().into())
            .encrypt_padded_mut::<NoPadding>(&mut buf, n)
            .expect("buffer is a multiple of the block size");
        STANDARD.encode(buf)
    }

    /// Encrypts with a fresh random prefix of 16 ASCII alphanumerics, as the vendor SDKs do.
    pub fn encrypt_fresh(&self, message: &[u8]) -> String {
        self.encrypt(&random_alnum::<RANDOM_LEN>(), message)
    }

    /// Decrypts and checks the receiver id (in constant time).
    pub fn decrypt(&self, encrypt: &str) -> Result<Decrypted, DecryptError> {
        let mut buf = STANDARD
            .decode(encrypt.trim())
            .map_err(|_| DecryptError::Base64)?;
        if buf.is_empty() || buf.len() % 16 != 0 {
            return Err(DecryptError::CiphertextLength(buf.len()));
        }
        let plain = Aes256CbcDec::new(&self.key.into(), &self.iv().into())
            .decrypt_padded_mut::<NoPadding>(&mut buf)
            .map_err(|_| DecryptError::CiphertextLength(encrypt.len()))?;
        // The vendor decoders strip nothing when the pad byte is out of range; rejecting it is
        // stricter and identical for valid traffic (PROTOCOLS.md §0.3). Like them, only the
        // last byte is read: the other pad bytes are not checked.
        let pad = *plain.last().expect("non-empty");
        if pad == 0 || pad as usize > PAD_BLOCK || pad as usize > plain.len() {
            return Err(DecryptError::Padding(pad));
        }
        let plain = &plain[..plain.len() - pad as usize];
        if plain.len() < HEADER_LEN {
            return Err(DecryptError::Truncated);
        }
        let declared = u32::from_be_bytes(plain[RANDOM_LEN..HEADER_LEN].try_into().unwrap());
        let available = plain.len() - HEADER_LEN;
        if declared as usize > available {
            return Err(DecryptError::Length {
                declared,
                available,
            });
        }
        let (message, receiver) = plain[HEADER_LEN..].split_at(declared as usize);
        if !bool::from(receiver.ct_eq(self.receiver_id.as_bytes())) {
            return Err(DecryptError::ReceiverMismatch);
        }
        let mut random = [0u8; RANDOM_LEN];
        random.copy_from_slice(&plain[..RANDOM_LEN]);
        Ok(Decrypted {
            random,
            message: message.to_vec(),
        })
    }
}

/// N random ASCII alphanumerics (nonces and random prefixes).
pub fn random_alnum<const N: usize>() -> [u8; N] {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    std::array::from_fn(|_| CHARS[rng.gen_range(0..CHARS.len())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D1_KEY: &str = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7";

    fn d1() -> MsgCrypt {
        MsgCrypt::new("mryue", D1_KEY, "ding6ccabc44d2c8d38b").unwrap()
    }

    #[test]
    fn key_and_iv_match_vector_d1() {
        let c = d1();
        assert_eq!(
            hex::encode(c.key),
            "62e7b411f74de7dd3473571ee5c7fa035e7673adc30ded7cd3c6bad1ce5e71de"
        );
        assert_eq!(hex::encode(c.iv()), "62e7b411f74de7dd3473571ee5c7fa03");
    }

    #[test]
    fn rejects_malformed_keys() {
        assert_eq!(
            MsgCrypt::new("t", &D1_KEY[..42], "r").unwrap_err(),
            KeyError
        );
        assert_eq!(
            MsgCrypt::new("t", &format!("{D1_KEY}a"), "r").unwrap_err(),
            KeyError
        );
        let with_symbol = format!("{}+", &D1_KEY[..42]);
        assert_eq!(MsgCrypt::new("t", &with_symbol, "r").unwrap_err(), KeyError);
    }

    fn tampered(c: &MsgCrypt, plain: &[u8]) -> String {
        let mut buf = plain.to_vec();
        let n = buf.len();
        Aes256CbcEnc::new(&c.key.into(), &c.iv().into())
            .encrypt_padded_mut::<NoPadding>(&mut buf, n)
            .unwrap();
        STANDARD.encode(buf)
    }

    #[test]
    fn rejects_bad_padding_and_lengths() {
        let c = d1();
        // Pad byte 0 and 33.
        let mut block = vec![b'a'; 64];
        block[63] = 0;
        assert_eq!(
            c.decrypt(&tampered(&c, &block)),
            Err(DecryptError::Padding(0))
        );
        block[63] = 33;
        assert_eq!(
            c.decrypt(&tampered(&c, &block)),
            Err(DecryptError::Padding(33))
        );
        // Length prefix larger than what follows.
        let mut plain = Vec::new();
        plain.extend_from_slice(b"0123456789abcdef");
        plain.extend_from_slice(&1000u32.to_be_bytes());
        plain.extend_from_slice(b"{}");
        plain.resize(32, 32 - 22);
        assert!(matches!(
            c.decrypt(&tampered(&c, &plain)),
            Err(DecryptError::Length { declared: 1000, .. })
        ));
        // Too short after unpadding to hold the header.
        let mut short = vec![b'x'; 16];
        short.resize(32, 16);
        assert_eq!(
            c.decrypt(&tampered(&c, &short)),
            Err(DecryptError::Truncated)
        );
        // Not base64, not a block multiple, empty.
        assert_eq!(c.decrypt("***"), Err(DecryptError::Base64));
        assert!(matches!(
            c.decrypt(&STANDARD.encode([0u8; 20])),
            Err(DecryptError::CiphertextLength(20))
        ));
        assert!(matches!(
            c.decrypt(""),
            Err(DecryptError::CiphertextLength(0))
        ));
    }

    #[test]
    fn rejects_other_receiver() {
        let other = MsgCrypt::new("mryue", D1_KEY, "dingother").unwrap();
        let ct = other.encrypt_fresh(b"{}");
        assert_eq!(d1().decrypt(&ct), Err(DecryptError::ReceiverMismatch));
    }

    proptest! {
        #[test]
        fn round_trip(message in proptest::collection::vec(any::<u8>(), 0..600),
                      random in any::<[u8; 16]>(),
                      receiver in "[a-zA-Z0-9]{0,40}",
                      key in "[a-zA-Z0-9]{43}") {
            let c = MsgCrypt::new("token", &key, &receiver).unwrap();
            let ct = c.encrypt(&random, &message);
            let raw = STANDARD.decode(&ct).unwrap();
            prop_assert_eq!(raw.len() % PAD_BLOCK, 0);
            let d = c.decrypt(&ct).unwrap();
            prop_assert_eq!(d.message, message);
            prop_assert_eq!(d.random, random);
        }

        #[test]
        fn never_panics_on_garbage(input in "[A-Za-z0-9+/=]{0,200}") {
            let _ = d1().decrypt(&input);
        }

        #[test]
        fn never_panics_on_arbitrary_blocks(blocks in proptest::collection::vec(any::<u8>(), 1..8)) {
            // Arbitrary ciphertexts of whole blocks decrypt to arbitrary plaintexts: exercises
            // every padding and length branch.
            let ct = STANDARD.encode(blocks.iter().flat_map(|b| [*b; 16]).collect::<Vec<_>>());
            let _ = d1().decrypt(&ct);
        }

        #[test]
        fn signature_is_order_independent_of_inputs(ts in "[0-9]{10,13}", nonce in "[a-zA-Z0-9]{1,16}") {
            let c = d1();
            let sig = c.signature(&ts, &nonce, "abc");
            prop_assert!(c.verify(&sig, &ts, &nonce, "abc"));
            prop_assert!(c.verify(&sig.to_uppercase(), &ts, &nonce, "abc"));
            prop_assert!(!c.verify(&sig, &ts, &nonce, "abd"));
        }
    }
}
