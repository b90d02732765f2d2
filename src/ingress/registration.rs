//! `imbridge dingtalk callback register|update|get|delete`: an http-mode DingTalk app's event
//! callback, registered with DingTalk's classic API (PROTOCOLS.md §1.1) from the command line.
//!
//! `register` and `update` first send the URL a `check_url` callback themselves, signed and
//! encrypted with the app's keys as DingTalk would, and go on only when the answer decrypts
//! to `success`: DingTalk does the same check before it accepts a registration, but answers a
//! failed one with a bare errcode, and a wrong URL (a typo, another app's path, a daemon with
//! other keys) is much easier to fix when the message says what came back.

use std::time::{Duration, Instant};

use super::oapi::OapiClient;
use crate::notify::http::{self, ReadError};
use crate::platform::dingtalk::callback::{self, DingTalkApp, ReplyError};
use crate::platform::dingtalk::oapi::{DingTalkOapi, OapiError, Registration};
use crate::platform::msgcrypt::MsgCrypt;
use crate::secret::{redact, Secret};

/// Exit code of a configuration or usage problem (EX_USAGE, as `check-config`).
pub const EXIT_CONFIG: u8 = 64;

/// Exit code when DingTalk refused or could not be reached, or the URL failed its check
/// (EX_UNAVAILABLE in sysexits.h).
pub const EXIT_REMOTE: u8 = 69;

/// How long DingTalk and the URL each get to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// DingTalk wants the `check_url` answer within this (PROTOCOLS.md §1.1).
const CHECK_URL_DEADLINE: Duration = Duration::from_millis(1500);

/// What to do with the registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Register,
    Update,
    Get,
    Delete,
}

/// One app as the configuration has it.
#[derive(Debug, Clone, Copy)]
pub struct App<'a> {
    pub name: &'a str,
    /// Its server-API credentials; `None` when it has no `app_key`.
    pub oapi: Option<&'a DingTalkOapi>,
    /// Its callback keys; `None` in stream mode.
    pub callback: Option<&'a DingTalkApp>,
}

/// Why a command failed; [`CliError::exit_code`] says how the process exits.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration lacks what the command needs: `key` names it.
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    /// The command line lacks something or holds something unusable.
    #[error("{0}")]
    Usage(String),
    /// The URL did not answer `check_url` as DingTalk requires; DingTalk was not called.
    #[error("{url} failed the check_url check, so nothing was registered: {why}")]
    Probe { url: String, why: ProbeError },
    #[error(transparent)]
    Oapi(#[from] OapiError),
    #[error("cannot build an HTTP client: {0}")]
    Client(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config { .. } | CliError::Usage(_) => EXIT_CONFIG,
            CliError::Probe { .. } | CliError::Oapi(_) | CliError::Client(_) => EXIT_REMOTE,
        }
    }

    fn config(app: &str, field: &str, message: impl Into<String>) -> Self {
        CliError::Config {
            key: format!("apps.dingtalk.{app}.{field}"),
            message: message.into(),
        }
    }
}

/// What came back from the URL instead of DingTalk's `success` reply.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("it cannot be reached ({0})")]
    Unreachable(String),
    #[error("it answered HTTP {status}{hint}")]
    Status { status: u16, hint: &'static str },
    #[error("its answer is over {} bytes", http::MAX_ANSWER_BYTES)]
    TooLarge,
    #[error("{0} (wrong app keys, or the URL of another app?)")]
    Reply(#[from] ReplyError),
}

/// What a command printed: the result for stdout, and warnings for stderr.
#[derive(Debug, Default)]
pub struct Outcome {
    pub output: String,
    pub warnings: Vec<String>,
}

/// Runs one command for `app`. `url` and `tags` are for `register` and `update`: without
/// `tags`, the app's `callback_tags`.
pub async fn run(
    app: App<'_>,
    action: Action,
    url: Option<&str>,
    tags: &[String],
) -> Result<Outcome, CliError> {
    let oapi = app.oapi.ok_or_else(|| {
        CliError::config(
            app.name,
            "app_key",
            "must be set (with app_secret, the app's AppKey and AppSecret) to call DingTalk's \
             server API",
        )
    })?;
    let client =
        OapiClient::new(oapi.clone(), TIMEOUT).map_err(|e| CliError::Client(e.to_string()))?;
    match action {
        Action::Register | Action::Update => set(app, oapi, &client, action, url, tags).await,
        Action::Get => get(app, &client).await,
        Action::Delete => {
            let token = access_token(&client).await?;
            client.delete(&token).await?;
            Ok(Outcome {
                output: format!("deleted the callback registration (app {})\n", app.name),
                warnings: Vec::new(),
            })
        }
    }
}

async fn access_token(client: &OapiClient) -> Result<Secret, OapiError> {
    Ok(Secret::new(client.gettoken().await?.token))
}

/// `register` or `update`: the URL checked first, then DingTalk called.
async fn set(
    app: App<'_>,
    oapi: &DingTalkOapi,
    client: &OapiClient,
    action: Action,
    url: Option<&str>,
    tags: &[String],
) -> Result<Outcome, CliError> {
    let crypt = &app
        .callback
        .ok_or_else(|| {
            CliError::config(
                app.name,
                "mode",
                "is \"stream\": a callback is registered for an http-mode app, whose token, \
                 aes_key and receiver_id sign and encrypt the pushes",
            )
        })?
        .crypt;
    let url = callback_url(app.name, url)?;
    let tags = chosen_tags(app.name, oapi, tags)?;
    let mut warnings = Vec::new();
    if crypt.receiver_id() == oapi.credentials.app_id {
        // [D] PROTOCOLS.md §1.1: the API-registered callback is encrypted for the corpId; the
        // AppKey is the receiver id of the console's event subscription.
        warnings.push(format!(
            "apps.dingtalk.{}.receiver_id is the AppKey: callbacks registered through the API \
             are encrypted for the corpId, so DingTalk's pushes may fail to decrypt",
            app.name
        ));
    }
    let took = probe(crypt, &url).await.map_err(|why| CliError::Probe {
        url: redact(&url).into_owned(),
        why,
    })?;
    if took > CHECK_URL_DEADLINE {
        warnings.push(format!(
            "{} answered check_url in {} ms; DingTalk wants an answer within {} ms",
            redact(&url),
            took.as_millis(),
            CHECK_URL_DEADLINE.as_millis()
        ));
    }
    let registration = Registration {
        tags,
        url,
        token: crypt.token(),
        aes_key: crypt.encoding_aes_key(),
    };
    let token = access_token(client).await?;
    let verb = match action {
        Action::Register => {
            client.register(&token, &registration).await?;
            "registered"
        }
        _ => {
            client.update(&token, &registration).await?;
            "updated"
        }
    };
    Ok(Outcome {
        output: format!(
            "{verb} the callback of app {}: {} for {} (check_url answered in {} ms)\n",
            app.name,
            redact(&registration.url),
            registration.tags.join(", "),
            took.as_millis()
        ),
        warnings,
    })
}

/// `get`: the registration, its token and key masked but compared with the app's.
async fn get(app: App<'_>, client: &OapiClient) -> Result<Outcome, CliError> {
    let token = access_token(client).await?;
    let r = client.get(&token).await?;
    let crypt = app.callback.map(|c| &c.crypt);
    let compare = |theirs: &Secret, ours: Option<Secret>, field: &str| -> String {
        match (theirs.expose().is_empty(), ours) {
            (true, _) => "(none)".into(),
            (false, None) => "***".into(),
            (false, Some(ours)) if ours == *theirs => {
                format!("*** (the same as apps.dingtalk.{}.{field})", app.name)
            }
            (false, Some(_)) => format!(
                "*** (NOT apps.dingtalk.{}.{field}: imbridge will refuse these pushes)",
                app.name
            ),
        }
    };
    let output = format!(
        "app: {}\nurl: {}\ntags: {}\ntoken: {}\naes_key: {}\n",
        app.name,
        redact(&r.url),
        r.tags.join(", "),
        compare(&r.token, crypt.map(MsgCrypt::token), "token"),
        compare(&r.aes_key, crypt.map(MsgCrypt::encoding_aes_key), "aes_key"),
    );
    Ok(Outcome {
        output,
        warnings: Vec::new(),
    })
}

fn callback_url(app: &str, url: Option<&str>) -> Result<String, CliError> {
    let example = format!("e.g. --url https://imbridge.example.com/callbacks/dingtalk/{app}");
    let url = url
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--url is required for register and update: the public URL DingTalk will push \
             this app's events to, {example}"
            ))
        })?;
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(url.to_owned()),
        _ => Err(CliError::Usage(format!(
            "--url {:?} is not an http(s) URL, {example}",
            redact(url)
        ))),
    }
}

/// `--tags` when given, else the app's `callback_tags`; never none.
fn chosen_tags(app: &str, oapi: &DingTalkOapi, given: &[String]) -> Result<Vec<String>, CliError> {
    let given: Vec<String> = given
        .iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(bad) = given.iter().find(|t| !crate::bus::is_valid_token(t)) {
        return Err(CliError::Usage(format!(
            "--tags: {bad:?} is not an event name (letters, digits, _ and -), e.g. \
             --tags user_add_org,bpms_instance_change"
        )));
    }
    let tags = if given.is_empty() {
        oapi.callback_tags.clone()
    } else {
        given
    };
    if tags.is_empty() {
        return Err(CliError::config(
            app,
            "callback_tags",
            "is empty and no --tags were given: name the events to subscribe to, e.g. \
             --tags user_add_org,bpms_instance_change",
        ));
    }
    Ok(tags)
}

/// Sends `url` a `check_url` callback as DingTalk does and checks the answer as DingTalk
/// does: HTTP 200 with a reply signed with the token that decrypts to `success`. Returns how
/// long the answer took.
pub async fn probe(crypt: &MsgCrypt, url: &str) -> Result<Duration, ProbeError> {
    // The probe plays DingTalk reaching our own public URL, from wherever this command runs:
    // not a platform call, so no proxy.
    let client = http::client(TIMEOUT, &crate::egress::Egress::Direct)
        .map_err(|e| ProbeError::Unreachable(e.to_string()))?;
    let sealed = callback::check_url(crypt, crate::platform::now_ms());
    let started = Instant::now();
    let response = client
        .post(url)
        .query(&sealed.query)
        .header("content-type", "application/json")
        .body(sealed.body)
        .send()
        .await
        .map_err(unreachable)?;
    let status = response.status().as_u16();
    let body = match http::read_capped(response).await {
        Ok(body) => body,
        Err(ReadError::Transport(e)) => return Err(unreachable(e)),
        Err(ReadError::TooLarge) => return Err(ProbeError::TooLarge),
    };
    let took = started.elapsed();
    if status != 200 {
        return Err(ProbeError::Status {
            status,
            hint: status_hint(status),
        });
    }
    callback::check_reply(crypt, &body)?;
    Ok(took)
}

fn unreachable(e: reqwest::Error) -> ProbeError {
    ProbeError::Unreachable(crate::platform::outbound::transport_answer(e, 0).detail)
}

/// What imbridge's own answers mean (`CallbackError::status`), for when the URL is one.
fn status_hint(status: u16) -> &'static str {
    match status {
        401 => {
            ": the signature was refused, so the daemon there has another token for this URL \
             (wrong app keys, or the URL of another app)"
        }
        403 => ": refused as encrypted for another receiver id (another receiver_id there)",
        400 => ": the callback was refused as unreadable (another aes_key there?)",
        404 => ": nothing there (an imbridge app's path is /callbacks/dingtalk/<app>)",
        300..=399 => ": a redirect, which DingTalk does not follow",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::AppCredentials;

    fn oapi(tags: &[&str]) -> DingTalkOapi {
        DingTalkOapi {
            egress: Default::default(),
            credentials: AppCredentials {
                base_url: "http://127.0.0.1:9".into(),
                app_id: "dingkey".into(),
                secret: Secret::new("s"),
                agent_id: 0,
            },
            api_base: String::new(),
            callback_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            recover_failed: None,
            allow_insecure: true,
        }
    }

    #[test]
    fn tags_from_the_command_line_or_the_config() {
        let given = ["a".to_owned(), " b ".to_owned(), String::new()];
        assert_eq!(chosen_tags("m", &oapi(&["c"]), &given).unwrap(), ["a", "b"]);
        assert_eq!(chosen_tags("m", &oapi(&["c"]), &[]).unwrap(), ["c"]);
        let e = chosen_tags("m", &oapi(&[]), &[]).unwrap_err();
        assert_eq!(e.exit_code(), EXIT_CONFIG);
        assert!(
            e.to_string().starts_with("apps.dingtalk.m.callback_tags: "),
            "{e}"
        );
        let e = chosen_tags("m", &oapi(&[]), &["a b".into()]).unwrap_err();
        assert!(matches!(e, CliError::Usage(_)), "{e}");
    }

    #[test]
    fn the_url_is_required_and_checked() {
        let e = callback_url("main", None).unwrap_err();
        assert!(e.to_string().contains("--url is required"), "{e}");
        assert!(e.to_string().contains("/callbacks/dingtalk/main"), "{e}");
        assert!(callback_url("main", Some("ftp://x/")).is_err());
        assert!(callback_url("main", Some("not a url")).is_err());
        assert_eq!(
            callback_url("main", Some(" https://x/callbacks/dingtalk/main ")).unwrap(),
            "https://x/callbacks/dingtalk/main"
        );
    }
}
