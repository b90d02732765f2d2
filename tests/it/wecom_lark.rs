//! WeCom and Lark callbacks through the real server, beside DingTalk on one daemon, on every
//! engine: each platform's handshake, an encrypted event arriving on its subject with the
//! documented body and headers, retries recognisable by `ce-id`, and bad input refused with a
//! JSON error and never published.

use crate::common::engine::Engine;
use crate::common::*;
use imbridge::platform::lark::callback as lark;
use imbridge::platform::msgcrypt::MsgCrypt;

fn apps() -> String {
    format!(
        r#"{MAIN_APP}
        [apps.wecom.main]
        token = "{WECOM_TOKEN}"
        aes_key = "{WECOM_KEY}"
        corp_id = "{WECOM_CORP}"
        [apps.wecom.raw]
        token = "{WECOM_TOKEN}"
        aes_key = "{WECOM_KEY}"
        corp_id = "{WECOM_CORP}"
        keep_raw_xml = true
        [apps.lark.main]
        verification_token = "{LARK_TOKEN}"
        encrypt_key = "{LARK_KEY}"
        [apps.lark.plain]
        verification_token = "{LARK_TOKEN}"
        allow_unsigned = true
        "#
    )
}

async fn app_on(engine: &Engine) -> TestApp {
    let app = TestApp::start(&toml_with(&format!("{}\n{}", engine.toml(), apps()))).await;
    app.wait_ready().await;
    app
}

/// Plays WeCom: encrypts with a fresh random prefix and signs with the current time.
struct WeCom {
    crypt: MsgCrypt,
}

impl WeCom {
    fn new(corp: &str) -> Self {
        WeCom {
            crypt: MsgCrypt::new(WECOM_TOKEN, WECOM_KEY, corp).unwrap(),
        }
    }

    fn query(&self, encrypt: &str) -> Vec<(String, String)> {
        let ts = (imbridge::platform::now_ms() / 1000).to_string();
        let nonce = "1372623149";
        vec![
            (
                "msg_signature".into(),
                self.crypt.signature(&ts, nonce, encrypt),
            ),
            ("timestamp".into(), ts),
            ("nonce".into(), nonce.into()),
        ]
    }

    async fn verify(&self, app: &TestApp, name: &str, echo: &str) -> reqwest::Response {
        let echostr = self.crypt.encrypt_fresh(echo.as_bytes());
        let mut query = self.query(&echostr);
        query.push(("echostr".into(), echostr));
        app.http
            .get(app.url(&format!("/callbacks/wecom/{name}")))
            .query(&query)
            .timeout(WAIT)
            .send()
            .await
            .unwrap()
    }

    /// Posts `xml` in the XML envelope; `envelope` may replace the envelope (for bad input).
    async fn post(&self, app: &TestApp, name: &str, xml: &str) -> reqwest::Response {
        let encrypt = self.crypt.encrypt_fresh(xml.as_bytes());
        let body = format!(
            "<xml><ToUserName><![CDATA[{WECOM_CORP}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt><AgentID><![CDATA[1000002]]></AgentID></xml>"
        );
        self.post_raw(app, name, &self.query(&encrypt), body).await
    }

    async fn post_raw(
        &self,
        app: &TestApp,
        name: &str,
        query: &[(String, String)],
        body: String,
    ) -> reqwest::Response {
        app.http
            .post(app.url(&format!("/callbacks/wecom/{name}")))
            .query(query)
            .header("content-type", "text/xml")
            .body(body)
            .timeout(WAIT)
            .send()
            .await
            .unwrap()
    }
}

const CHANGE_CONTACT: &str = "<xml><ToUserName><![CDATA[ww1436e0e65a779aee]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName><CreateTime>1403610513</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[change_contact]]></Event><ChangeType>create_user</ChangeType><UserID><![CDATA[zhangsan]]></UserID><Name>张三 &amp; co</Name><Alias><![CDATA[a&amp;b <x>]]></Alias></xml>";
const TEXT_MESSAGE: &str = "<xml><ToUserName>ww1436e0e65a779aee</ToUserName><FromUserName>ChenJiaShun</FromUserName><CreateTime>1476422779</CreateTime><MsgType>text</MsgType><Content>你好</Content><MsgId>1456453720</MsgId><AgentID>1000002</AgentID></xml>";

fn lark_event(event_id: &str) -> String {
    format!(
        r#"{{"schema":"2.0","header":{{"event_id":"{event_id}","token":"{LARK_TOKEN}","create_time":"1608725989000","event_type":"im.message.receive_v1","tenant_key":"736588c9260f175e","app_id":"cli_a1"}},"event":{{"message":{{"chat_id":"oc_1","content":"{{\"text\":\"hi\"}}"}}}}}}"#
    )
}

/// Posts `plaintext` to a Lark app: encrypted and signed with the app's key when `key` is set.
async fn lark_post(
    app: &TestApp,
    name: &str,
    plaintext: &str,
    key: Option<&str>,
) -> reqwest::Response {
    let mut req = app
        .http
        .post(app.url(&format!("/callbacks/lark/{name}")))
        .header("content-type", "application/json")
        .timeout(WAIT);
    let body = match key {
        Some(key) => {
            let encrypt = lark::encrypt_with_iv(key, rand::random(), plaintext.as_bytes());
            let body = serde_json::json!({ "encrypt": encrypt }).to_string();
            let ts = (imbridge::platform::now_ms() / 1000).to_string();
            let nonce = "13341";
            req = req
                .header(lark::TIMESTAMP_HEADER, &ts)
                .header(lark::NONCE_HEADER, nonce)
                .header(
                    lark::SIGNATURE_HEADER,
                    lark::signature(&ts, nonce, key, body.as_bytes()),
                );
            body
        }
        None => plaintext.to_owned(),
    };
    req.body(body).send().await.unwrap()
}

#[tokio::test]
async fn three_platforms_on_one_daemon_on_every_engine() {
    for engine in Engine::all() {
        let name = engine.name();
        let app = app_on(&engine).await;
        let mut contacts = engine.watch(&app, "wecom.change_contact");
        let mut texts = engine.watch(&app, "wecom.msg.text");
        let mut lark_events = engine.watch(&app, "lark.im.message.receive_v1");
        let mut approvals = engine.watch(&app, "dingtalk.bpms_instance_change");
        let wecom = WeCom::new(WECOM_CORP);

        // WeCom's URL verification: the decrypted echostr, and nothing else.
        let res = wecom.verify(&app, "main", "1288432023552776189").await;
        assert_eq!(res.status(), 200, "{name}");
        assert_eq!(res.text().await.unwrap(), "1288432023552776189");
        assert_eq!(app.platform_callbacks("wecom", "main", "verify_url"), 1);

        // An event: empty 200 once published, on wecom.<Event>, body the flat JSON.
        let res = wecom.post(&app, "main", CHANGE_CONTACT).await;
        assert_eq!(res.status(), 200, "{name}");
        assert!(
            res.bytes().await.unwrap().is_empty(),
            "{name}: empty answer"
        );
        let m = &contacts.next(&engine, 1).await[0];
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["ChangeType"], "create_user", "{name}");
        assert_eq!(body["UserID"], "zhangsan");
        assert_eq!(body["Name"], "张三 & co", "entities resolved");
        assert_eq!(
            body["Alias"], "a&amp;b <x>",
            "CDATA unwrapped, taken literally"
        );
        assert_eq!(body["CreateTime"], "1403610513");
        assert_eq!(m.header(&engine.ce("type")), Some("wecom.change_contact"));
        assert_eq!(m.header(&engine.ce("source")), Some("wecom/main"));
        assert_eq!(m.header("imbridge-tenant"), Some(WECOM_CORP), "{name}");
        assert_eq!(m.header("content-type"), Some("application/json"));
        let contact_id = m.header(&engine.ce("id")).unwrap().to_owned();
        // WeCom retries it (fresh encryption): recognised by ce-id.
        assert_eq!(wecom.post(&app, "main", CHANGE_CONTACT).await.status(), 200);
        assert_eq!(
            app.platform_callbacks("wecom", "main", "duplicate"),
            1,
            "{name}"
        );

        // A message: on wecom.msg.<MsgType>; the raw XML too where configured.
        assert_eq!(wecom.post(&app, "raw", TEXT_MESSAGE).await.status(), 200);
        let m = &texts.next(&engine, 1).await[0];
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["Content"], "你好", "{name}");
        assert_eq!(body["MsgId"], "1456453720");
        assert_eq!(body["#xml"], TEXT_MESSAGE, "{name}: raw XML byte for byte");
        assert_ne!(m.header(&engine.ce("id")), Some(contact_id.as_str()));

        // Lark: the challenge, plain and encrypted, answered and not published.
        let challenge = format!(
            r#"{{"challenge":"ajls384kdjx98XX","token":"{LARK_TOKEN}","type":"url_verification"}}"#
        );
        for (app_name, key) in [("plain", None), ("main", Some(LARK_KEY))] {
            let res = lark_post(&app, app_name, &challenge, key).await;
            assert_eq!(res.status(), 200, "{name} {app_name}");
            let body: serde_json::Value = res.json().await.unwrap();
            assert_eq!(body, serde_json::json!({"challenge": "ajls384kdjx98XX"}));
        }
        // An encrypted, signed v2 event: byte for byte on lark.<event_type>, ce-id = event_id.
        let event = lark_event(&format!("ev-{name}"));
        let res = lark_post(&app, "main", &event, Some(LARK_KEY)).await;
        assert_eq!(res.status(), 200, "{name}");
        let m = &lark_events.next(&engine, 1).await[0];
        assert_eq!(m.payload, event.as_bytes(), "{name}");
        let id = format!("ev-{name}");
        assert_eq!(m.header(&engine.ce("id")), Some(id.as_str()));
        assert_eq!(m.header(&engine.ce("source")), Some("lark/main"));
        assert_eq!(m.header("imbridge-tenant"), Some("736588c9260f175e"));
        // Lark re-pushes the same event within its retry window: same ce-id, stored once.
        assert_eq!(
            lark_post(&app, "main", &event, Some(LARK_KEY))
                .await
                .status(),
            200
        );
        assert_eq!(
            app.platform_callbacks("lark", "main", "duplicate"),
            1,
            "{name}"
        );

        // And DingTalk, on the same daemon.
        let dt = DingTalk::main();
        let approval = approval_event(&format!("three-{name}"));
        assert_eq!(
            dt.callback(&approval).post(&app, "main").await.status(),
            200
        );
        assert_eq!(
            approvals.next(&engine, 1).await[0].payload,
            approval.as_bytes()
        );

        if !matches!(engine, Engine::Memory) {
            for subject in [
                "wecom.change_contact",
                "wecom.msg.text",
                "lark.im.message.receive_v1",
            ] {
                assert_eq!(
                    engine.stored(subject).await,
                    1,
                    "{name}: {subject} stored once"
                );
            }
        }
        app.stop().await;
    }
}

/// Checks a refusal: status and JSON code, counted under the app.
async fn refused(res: reqwest::Response, status: u16, code: &str) {
    assert_eq!(res.status(), status, "{code}");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
}

#[tokio::test]
async fn bad_input_is_refused_and_never_published() {
    let engine = Engine::Memory;
    let app = app_on(&engine).await;
    let mut everything = app.bus.memory().unwrap().subscribe(">");
    let wecom = WeCom::new(WECOM_CORP);

    // WeCom: a signature over something else.
    let encrypt = wecom.crypt.encrypt_fresh(CHANGE_CONTACT.as_bytes());
    let mut query = wecom.query("something else");
    let envelope = |e: &str| format!("<xml><Encrypt><![CDATA[{e}]]></Encrypt></xml>");
    refused(
        wecom
            .post_raw(&app, "main", &query, envelope(&encrypt))
            .await,
        401,
        "invalid_signature",
    )
    .await;
    // echostr that is not base64.
    query = wecom.query("not_base64!!!");
    query.push(("echostr".into(), "not_base64!!!".into()));
    let res = app
        .http
        .get(app.url("/callbacks/wecom/main"))
        .query(&query)
        .send()
        .await
        .unwrap();
    refused(res, 400, "invalid_base64").await;
    // Encrypted for another corp.
    let other = WeCom::new("wwsomeoneelse");
    let res = other.post(&app, "main", CHANGE_CONTACT).await;
    refused(res, 403, "receiver_mismatch").await;
    // An envelope without Encrypt, malformed XML, an entity-expansion attempt.
    let q = wecom.query("");
    refused(
        wecom
            .post_raw(
                &app,
                "main",
                &q,
                "<xml><ToUserName>x</ToUserName></xml>".into(),
            )
            .await,
        400,
        "missing_encrypt",
    )
    .await;
    refused(
        wecom
            .post_raw(&app, "main", &q, "<xml><Encrypt>abc</Encr".into())
            .await,
        400,
        "invalid_xml",
    )
    .await;
    let bomb = r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]><xml><Encrypt>&b;</Encrypt></xml>"#;
    refused(
        wecom.post_raw(&app, "main", &q, bomb.into()).await,
        400,
        "unsupported_xml",
    )
    .await;
    // The same trick inside a correctly encrypted and signed message.
    let res = wecom
        .post(&app, "main", r#"<!DOCTYPE xml [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><Content>&e;</Content></xml>"#)
        .await;
    refused(res, 400, "unsupported_xml").await;
    // Over server.max_body_bytes (64 KiB by default); the decrypted XML's own limits are
    // unit-tested in platform::wecom::callback.
    let huge = format!("<xml><Encrypt>{}</Encrypt></xml>", "A".repeat(70_000));
    let res = app
        .http
        .post(app.url("/callbacks/wecom/main"))
        .query(&q)
        .body(huge)
        .send()
        .await
        .unwrap();
    refused(res, 413, "body_too_large").await;

    // Lark: a wrong signature, no signature headers, a wrong token, plaintext that is no JSON.
    let event = lark_event("bad-1");
    let encrypt = lark::encrypt_with_iv(LARK_KEY, [7; 16], event.as_bytes());
    let body = serde_json::json!({ "encrypt": encrypt }).to_string();
    let res = app
        .http
        .post(app.url("/callbacks/lark/main"))
        .header(lark::TIMESTAMP_HEADER, "1608725989")
        .header(lark::NONCE_HEADER, "n")
        .header(lark::SIGNATURE_HEADER, "0".repeat(64))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    refused(res, 401, "invalid_signature").await;
    let res = app
        .http
        .post(app.url("/callbacks/lark/main"))
        .body(body)
        .send()
        .await
        .unwrap();
    refused(res, 401, "missing_signature").await;
    let wrong_token = event.replace(LARK_TOKEN, "not-the-token");
    refused(
        lark_post(&app, "main", &wrong_token, Some(LARK_KEY)).await,
        401,
        "invalid_token",
    )
    .await;
    refused(
        lark_post(&app, "plain", &wrong_token, None).await,
        401,
        "invalid_token",
    )
    .await;
    refused(
        lark_post(&app, "main", "not json at all", Some(LARK_KEY)).await,
        400,
        "invalid_json",
    )
    .await;
    let unknown_schema = event.replace(r#""schema":"2.0""#, r#""schema":"3.0""#);
    refused(
        lark_post(&app, "main", &unknown_schema, Some(LARK_KEY)).await,
        400,
        "unknown_schema",
    )
    .await;
    // A ciphertext shorter than 32 bytes.
    let short = serde_json::json!({ "encrypt": "AAAAAAAAAAAAAAAAAAAAAA==" }).to_string();
    let ts = &(imbridge::platform::now_ms() / 1000).to_string();
    let res = app
        .http
        .post(app.url("/callbacks/lark/main"))
        .header(lark::TIMESTAMP_HEADER, ts)
        .header(lark::NONCE_HEADER, "n")
        .header(
            lark::SIGNATURE_HEADER,
            lark::signature(ts, "n", LARK_KEY, short.as_bytes()),
        )
        .body(short)
        .send()
        .await
        .unwrap();
    refused(res, 400, "invalid_ciphertext_length").await;

    // Unknown apps on both platforms.
    refused(
        wecom.post(&app, "nosuch", CHANGE_CONTACT).await,
        404,
        "unknown_app",
    )
    .await;
    refused(
        lark_post(&app, "nosuch", &event, None).await,
        404,
        "unknown_app",
    )
    .await;
    assert_eq!(app.platform_callbacks("lark", "_unknown", "unknown_app"), 1);
    assert_eq!(
        app.platform_callbacks("wecom", "main", "invalid_signature"),
        1
    );

    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(everything.try_next().is_none(), "nothing is published");
    app.stop().await;
}
