//! The HTTP client every request to a platform goes through, and how answers are read: no
//! redirects followed (a platform that answers with one is misconfigured, or someone wants the
//! signed request sent elsewhere), and no answer read past a size cap.

use std::time::Duration;

/// The most of an answer read: platform answers are small JSON, and nothing a platform (or
/// whatever answers in its place) sends may grow the process without bound.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why an answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("answer over {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
}

/// The client for platform requests: `timeout` per request, no redirects.
pub fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("imbridge/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The answer's body, up to [`MAX_ANSWER_BYTES`].
pub async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, ReadError> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
