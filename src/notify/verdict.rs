//! How a delivery ended, and why a message was not delivered: what decides between an ack, a
//! dead letter and a redelivery, and what `POST /notify?wait=true` answers.

use super::compose::ComposeError;
use super::guard::Refusal;
use crate::platform::outbound::Answer;

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every part accepted; the last answer.
    Delivered { parts: usize, answer: Answer },
    /// Not delivered: why, how many sends were tried, and the platform's last answer.
    Failed {
        reason: Reason,
        attempts: u32,
        answer: Option<Answer>,
    },
}

/// Why a notification was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The platform refused it for good (bad signature, invalid token, bad message).
    Permanent,
    /// Transient failures until `notify.max_attempts` ran out.
    AttemptsExhausted,
    /// Not delivered within `notify.max_wait` (throttled, paused or retried too long).
    Expired,
    /// "Too fast" answers `notify.max_attempts` times in a row for this message: the platform
    /// may be using the code for something about the message itself.
    RateLimited,
    /// The daemon is stopping; the message goes back to the bus.
    Shutdown,
    /// The bus gave the message to another replica (a Kafka partition moved); it is theirs.
    Moved,
    UnknownTarget,
    InvalidMessage,
    /// The template failed on this payload.
    TemplateError,
    /// An app message none of whose recipients is bound on the platform.
    NoRecipients,
    /// The platform refused the app's credentials when asked for an access token.
    TokenRefused,
    /// The body names people outside `to` and `mentions` (a raw body's `touser`, say).
    EmbeddedRecipients,
    /// A send to everyone on a target without `allow_broadcast`.
    BroadcastForbidden,
    /// More people than `notify.max_recipients`.
    TooManyRecipients,
}

impl Reason {
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Permanent => "permanent",
            Reason::AttemptsExhausted => "attempts_exhausted",
            Reason::Expired => "expired",
            Reason::RateLimited => "rate_limited",
            Reason::Shutdown => "shutdown",
            Reason::Moved => "moved",
            Reason::UnknownTarget => "unknown_target",
            Reason::InvalidMessage => "invalid_message",
            Reason::TemplateError => "template_error",
            Reason::NoRecipients => "no_recipients",
            Reason::TokenRefused => "token_refused",
            Reason::EmbeddedRecipients => "embedded_recipients",
            Reason::BroadcastForbidden => "broadcast_forbidden",
            Reason::TooManyRecipients => "too_many_recipients",
        }
    }
}

/// The dead-letter reason of a message that cannot be composed.
impl From<&ComposeError> for Reason {
    fn from(e: &ComposeError) -> Self {
        match e {
            ComposeError::Invalid(_) => Reason::InvalidMessage,
            ComposeError::Template(_) => Reason::TemplateError,
            ComposeError::NoRecipients { .. } => Reason::NoRecipients,
            ComposeError::Refused(Refusal::Embedded { .. }) => Reason::EmbeddedRecipients,
            ComposeError::Refused(Refusal::Broadcast { .. }) => Reason::BroadcastForbidden,
            ComposeError::Refused(Refusal::TooMany { .. }) => Reason::TooManyRecipients,
        }
    }
}
