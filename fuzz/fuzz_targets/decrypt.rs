//! The two AES schemes with a fixed key: decrypting any string never panics and reports a typed
//! error, and whatever is encrypted decrypts back to itself. First byte: 0 = the input as
//! base64 text for `MsgCrypt::decrypt` (DingTalk and WeCom); 1 = the input as ciphertext bytes
//! (so that it reaches AES and the padding and length checks); 2 = the input as Lark's
//! `encrypt` text; 3 = the input as Lark ciphertext bytes; 4 = round trips of the input.
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use imbridge::platform::lark::callback::{decrypt, encrypt_with_iv};
use imbridge::platform::msgcrypt::MsgCrypt;
use imbridge_fuzz::{split_mode, LARK_KEY, WECOM_AES_KEY, WECOM_CORP, WECOM_TOKEN};
use libfuzzer_sys::fuzz_target;

fn crypt() -> &'static MsgCrypt {
    static CRYPT: OnceLock<MsgCrypt> = OnceLock::new();
    CRYPT.get_or_init(|| MsgCrypt::new(WECOM_TOKEN, WECOM_AES_KEY, WECOM_CORP).expect("vector key"))
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, input)) = split_mode(data) else {
        return;
    };
    match mode % 5 {
        0 => {
            if let Err(e) = crypt().decrypt(&String::from_utf8_lossy(input)) {
                assert!(!e.code().is_empty());
            }
        }
        1 => {
            if let Ok(d) = crypt().decrypt(&STANDARD.encode(input)) {
                // What decrypts is at most the ciphertext minus the header.
                assert!(d.message.len() + 20 <= input.len());
            }
        }
        2 => {
            if let Err(e) = decrypt(LARK_KEY, &String::from_utf8_lossy(input)) {
                assert!(!e.code().is_empty());
            }
        }
        3 => {
            if let Ok(plain) = decrypt(LARK_KEY, &STANDARD.encode(input)) {
                assert!(plain.len() + 16 < input.len());
            }
        }
        _ => {
            let random: [u8; 16] = std::array::from_fn(|i| input.get(i).copied().unwrap_or(0));
            let d = crypt()
                .decrypt(&crypt().encrypt(&random, input))
                .expect("our own ciphertext decrypts");
            assert_eq!((d.message.as_slice(), d.random), (input, random));
            let lark = encrypt_with_iv(LARK_KEY, random, input);
            assert_eq!(decrypt(LARK_KEY, &lark).as_deref(), Ok(input));
        }
    }
});
