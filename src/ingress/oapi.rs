//! DingTalk's classic server API, sent: `gettoken` and `call_back/*` for one app (PROTOCOLS.md
//! §1.1). What is sent and how answers read is [`crate::platform::dingtalk::oapi`]'s; this
//! file only does the I/O, through the platform HTTP client (no redirects, capped answers).

use std::time::Duration;

use crate::notify::http::{self, ReadError};
use crate::platform::dingtalk::oapi::{
    self, call, call_url, gettoken_url, DingTalkOapi, FailedPage, OapiError, Registration,
};
use crate::platform::outbound::{self, IssuedToken};
use crate::secret::Secret;

/// Sends the classic API's calls for one app. Cheap to clone; the access token is the
/// caller's to fetch ([`OapiClient::gettoken`]), keep and refetch when a call says it was
/// rejected ([`OapiError::is_token_rejected`]).
#[derive(Debug, Clone)]
pub struct OapiClient {
    http: reqwest::Client,
    oapi: DingTalkOapi,
}

impl OapiClient {
    /// A client with its own HTTP client (no redirects, `timeout` per request).
    pub fn new(oapi: DingTalkOapi, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(OapiClient {
            http: http::client(timeout, &oapi.egress)?,
            oapi,
        })
    }

    pub fn oapi(&self) -> &DingTalkOapi {
        &self.oapi
    }

    /// `gettoken` with the app's AppKey and AppSecret.
    pub async fn gettoken(&self) -> Result<IssuedToken, OapiError> {
        let url = gettoken_url(&self.oapi.credentials);
        let (status, body) = self.send(call::GETTOKEN, self.http.get(url)).await?;
        oapi::parse_token(status, &body)
    }

    /// `register_call_back`: DingTalk checks the URL with a `check_url` push first.
    pub async fn register(
        &self,
        access_token: &Secret,
        registration: &Registration,
    ) -> Result<(), OapiError> {
        self.post(call::REGISTER, access_token, registration).await
    }

    /// `update_call_back`: replaces the registration (and checks the URL as `register` does).
    pub async fn update(
        &self,
        access_token: &Secret,
        registration: &Registration,
    ) -> Result<(), OapiError> {
        self.post(call::UPDATE, access_token, registration).await
    }

    /// `get_call_back`: the current registration.
    pub async fn get(&self, access_token: &Secret) -> Result<Registration, OapiError> {
        let (status, body) = self.get_call(call::GET, access_token).await?;
        oapi::parse_registration(status, &body)
    }

    /// `delete_call_back`.
    pub async fn delete(&self, access_token: &Secret) -> Result<(), OapiError> {
        let (status, body) = self.get_call(call::DELETE, access_token).await?;
        oapi::parse_answer(call::DELETE, status, &body).map(drop)
    }

    /// `get_call_back_failed_result`: one page of failed pushes.
    pub async fn failed(&self, access_token: &Secret) -> Result<FailedPage, OapiError> {
        let (status, body) = self.get_call(call::FAILED, access_token).await?;
        oapi::parse_failed(status, &body)
    }

    async fn post(
        &self,
        name: &'static str,
        access_token: &Secret,
        registration: &Registration,
    ) -> Result<(), OapiError> {
        let url = call_url(&self.oapi.credentials.base_url, name, access_token);
        let request = self.http.post(url).json(&registration.body());
        let (status, body) = self.send(name, request).await?;
        oapi::parse_answer(name, status, &body).map(drop)
    }

    async fn get_call(
        &self,
        name: &'static str,
        access_token: &Secret,
    ) -> Result<(u16, Vec<u8>), OapiError> {
        let url = call_url(&self.oapi.credentials.base_url, name, access_token);
        self.send(name, self.http.get(url)).await
    }

    /// Sends and reads the answer up to the cap. Transport errors lose their URL.
    async fn send(
        &self,
        call: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Vec<u8>), OapiError> {
        let transport = |e: reqwest::Error| OapiError::Transport {
            call,
            detail: outbound::transport_answer(e, 0).detail,
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        match http::read_capped(response).await {
            Ok(body) => Ok((status, body)),
            Err(ReadError::Transport(e)) => Err(transport(e)),
            Err(e @ ReadError::TooLarge) => Err(OapiError::Status {
                call,
                status,
                detail: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::dingtalk::oapi::API_BASE;
    use crate::platform::AppCredentials;

    fn creds(base: &str) -> AppCredentials {
        AppCredentials {
            base_url: base.to_owned(),
            app_id: "ding key".into(),
            secret: Secret::new("s+c/r=t&x"),
            agent_id: 0,
        }
    }

    /// A server answering every request with `body`, recording the request line and body.
    async fn server(body: &'static str) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use warp::Filter;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let route = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::body::bytes())
            .map(
                move |m: warp::http::Method,
                      p: warp::path::FullPath,
                      q: String,
                      b: bytes::Bytes| {
                    log.lock().unwrap().push(format!(
                        "{m} {}?{q} {}",
                        p.as_str(),
                        String::from_utf8_lossy(&b)
                    ));
                    body
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        (format!("http://{addr}"), seen)
    }

    fn client(base: &str) -> OapiClient {
        let oapi = DingTalkOapi {
            egress: Default::default(),
            credentials: creds(base),
            api_base: API_BASE.into(),
            callback_tags: vec![],
            recover_failed: None,
            allow_insecure: true,
        };
        OapiClient::new(oapi, Duration::from_secs(5)).unwrap()
    }

    #[tokio::test]
    async fn client_sends_each_call_as_documented() {
        let (base, seen) = server(r#"{"errcode":0,"errmsg":"ok","access_token":"t-1"}"#).await;
        let c = client(&base);
        let token = Secret::new(c.gettoken().await.unwrap().token);
        let r = Registration {
            tags: vec!["user_add_org".into()],
            url: "http://u/".into(),
            token: Secret::new("tok"),
            aes_key: Secret::new("key"),
        };
        c.register(&token, &r).await.unwrap();
        c.update(&token, &r).await.unwrap();
        c.get(&token).await.unwrap();
        c.delete(&token).await.unwrap();
        c.failed(&token).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let body =
            r#"{"aes_key":"key","call_back_tag":["user_add_org"],"token":"tok","url":"http://u/"}"#;
        assert_eq!(
            seen,
            [
                "GET /gettoken?appkey=ding+key&appsecret=s%2Bc%2Fr%3Dt%26x ".to_owned(),
                format!("POST /call_back/register_call_back?access_token=t-1 {body}"),
                format!("POST /call_back/update_call_back?access_token=t-1 {body}"),
                "GET /call_back/get_call_back?access_token=t-1 ".into(),
                "GET /call_back/delete_call_back?access_token=t-1 ".into(),
                "GET /call_back/get_call_back_failed_result?access_token=t-1 ".into(),
            ]
        );
    }

    #[tokio::test]
    async fn transport_errors_hide_the_secret_and_the_token() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = client(&format!("http://127.0.0.1:{port}"));
        let e = c.gettoken().await.unwrap_err();
        assert!(matches!(e, OapiError::Transport { .. }) && e.is_transient());
        let shown = e.to_string();
        assert!(
            !shown.contains("s%2Bc") && !shown.contains("appsecret"),
            "{shown}"
        );
        let e = c.delete(&Secret::new("t0ken")).await.unwrap_err();
        assert!(!e.to_string().contains("t0ken"), "{e}");
    }
}
