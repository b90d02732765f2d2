//! Message templates: `[templates.<name>]` in the config turns a message body (a ZenTao payload
//! or a notification) into the title, text, url, mentions and recipients of a notification.
//!
//! Templates are Jinja (minijinja), written by the operator in the config file, so:
//! - every field is compiled by [`Templates::compile`] at startup, and a syntax error or an
//!   unknown filter is reported there with its key and line, not at the first message;
//! - missing fields render empty and chain (`payload.a.b` on a missing `a`), because payloads
//!   only carry the fields the sender selected; JSON `null` renders empty too;
//! - output is not escaped (chat text, not HTML);
//! - each render has a fuel budget, so a template cannot loop or allocate without bound.
//!
//! Variables: `payload` (the whole body), each top-level field of the body (`{{ objectType }}`),
//! `target`, `kind` and `route`. Helpers: `link(text, url)`, `mention(account)`, and the filters
//! `date`, `accounts` and `strip_html` (plus minijinja's built-in filters).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use jiff::civil::DateTime;
use jiff::tz::{Offset, TimeZone};
use jiff::Timestamp;
use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};

use crate::message::html::html_to_text;
use crate::message::Format;

/// Fuel per field render. minijinja charges about one unit per instruction and per 64 bytes
/// produced, so this allows some 100 000 steps or 6 MB: far beyond any chat message, yet it
/// stops `{% for i in range(99999) %}{% for j in range(99999) %}` in well under a second.
const FUEL: u64 = 100_000;

/// VM recursion limit. Renders run on async worker threads with small stacks, and templates
/// without macros or includes never nest deeply.
const RECURSION_LIMIT: usize = 100;

/// One `[templates.<name>]` table. Every string except `format` is a template source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// The title (DingTalk markdown and Lark cards show it); empty output means no title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The message text (required); empty output is an error, as an empty message would be.
    pub text: String,
    /// A link to the object; empty output means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How `text` is meant: `markdown` (the default) or `text`; `link()` follows it.
    #[serde(default)]
    pub format: Format,
    /// Account names to @mention, separated by commas or spaces, in addition to those the text
    /// mentions with `mention()`. `{{ mailto|accounts }}` works as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mentions: Option<String>,
    /// Account names receiving app messages (work notifications), separated likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// The fields of a template, in render order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Title,
    Text,
    Url,
    Mentions,
    To,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Title => "title",
            Field::Text => "text",
            Field::Url => "url",
            Field::Mentions => "mentions",
            Field::To => "to",
        }
    }

    /// The config key, which is also the name the environment knows the source by.
    fn key(self, template: &str) -> String {
        format!("templates.{template}.{}", self.name())
    }
}

/// What a template has besides its sources (those live in the environment).
struct Def {
    format: Format,
    fields: Vec<Field>,
}

struct Inner {
    env: Environment<'static>,
    defs: BTreeMap<String, Def>,
}

/// The compiled `[templates]` of the config; cheap to clone and shared by every task.
#[derive(Clone)]
pub struct Templates {
    inner: Arc<Inner>,
}

impl Default for Templates {
    /// No templates (a configuration without `[templates]`).
    fn default() -> Self {
        Templates::compile(&BTreeMap::new()).expect("an empty set of templates compiles")
    }
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Templates")
            .field("names", &self.inner.defs.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What a template is rendered with.
pub struct Context<'a> {
    /// The message body as JSON (ZenTao payload or notification).
    pub payload: &'a serde_json::Value,
    pub target: &'a str,
    /// The target's kind, e.g. "wecom_app".
    pub kind: &'a str,
    pub route: Option<&'a str>,
    /// Bound users' names, for `mention()` and `person()` (shared, since minijinja functions
    /// must own what they use).
    pub names: &'a Arc<People>,
}

/// The names templates show for people (`[users.<account>]`).
#[derive(Debug, Default)]
pub struct People {
    /// Display names by account.
    pub by_account: HashMap<String, String>,
    /// By platform (`dingtalk`, `wecom`, `lark`) and that platform's user id: the account's
    /// display name, else the account, so an event naming a platform user (an approval's
    /// `staffId`) can say who that is.
    pub by_id: HashMap<(String, String), String>,
}

/// A rendered template: the parts of a notification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    pub title: Option<String>,
    pub text: String,
    pub url: Option<String>,
    pub format: Format,
    /// Accounts passed to `mention()`, then those of the `mentions` field; no duplicates.
    pub mentions: Vec<String>,
    /// Accounts of the `to` field; no duplicates.
    pub to: Vec<String>,
}

/// A template failed to render (or does not exist).
#[derive(Debug, thiserror::Error)]
#[error("template {name:?}: {message}")]
pub struct TemplateError {
    pub name: String,
    pub message: String,
}

impl Templates {
    /// Compiles every field of every template. Errors are `(key, message)` pairs, all of them
    /// at once, with keys like `templates.zentao.text` and messages naming the line.
    pub fn compile(
        defs: &BTreeMap<String, TemplateConfig>,
    ) -> Result<Templates, Vec<(String, String)>> {
        Templates::compile_in(defs, None)
    }

    /// [`Templates::compile`], the `date` filter showing times in `zone` (`[notify]
    /// timezone`) unless a template names its own; `None` keeps the filter's zone-less
    /// behaviour (unix times in UTC, RFC 3339 in its own offset).
    pub fn compile_in(
        defs: &BTreeMap<String, TemplateConfig>,
        zone: Option<TimeZone>,
    ) -> Result<Templates, Vec<(String, String)>> {
        let mut env = environment(zone);
        let mut errors = Vec::new();
        let mut compiled = BTreeMap::new();
        for (name, def) in defs {
            let sources = [
                (Field::Title, def.title.as_deref()),
                (Field::Text, Some(def.text.as_str())),
                (Field::Url, def.url.as_deref()),
                (Field::Mentions, def.mentions.as_deref()),
                (Field::To, def.to.as_deref()),
            ];
            let mut fields = Vec::new();
            for (field, source) in sources {
                let Some(source) = source else { continue };
                let key = field.key(name);
                if field == Field::Text && source.trim().is_empty() {
                    errors.push((key, "must not be empty".to_owned()));
                    continue;
                }
                for zone in literal_zones(source) {
                    if let Err(message) = time_zone(&zone) {
                        errors.push((key.clone(), message));
                    }
                }
                match env.add_template_owned(key.clone(), source.to_owned()) {
                    Ok(()) => fields.push(field),
                    Err(e) => errors.push((key, describe(&e))),
                }
            }
            compiled.insert(
                name.clone(),
                Def {
                    format: def.format,
                    fields,
                },
            );
        }
        // Filters are looked up only when they run, so check the names now.
        for (name, def) in &compiled {
            for field in &def.fields {
                let key = field.key(name);
                let Ok(tmpl) = env.get_template(&key) else {
                    continue;
                };
                let mut seen = HashSet::new();
                for (filter, line) in used_filters(tmpl.source()) {
                    if seen.insert(filter.clone()) && !filter_exists(&env, &filter) {
                        errors.push((
                            key.clone(),
                            format!("unknown filter {filter} on line {line}"),
                        ));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(Templates {
                inner: Arc::new(Inner {
                    env,
                    defs: compiled,
                }),
            })
        } else {
            Err(errors)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.defs.contains_key(name)
    }

    /// Renders template `name`. Safe to call from many tasks at once: what `mention()` records
    /// belongs to this call alone.
    pub fn render(&self, name: &str, ctx: &Context<'_>) -> Result<Rendered, TemplateError> {
        let error = |message: String| TemplateError {
            name: name.to_owned(),
            message,
        };
        let def = self
            .inner
            .defs
            .get(name)
            .ok_or_else(|| error("no such template".to_owned()))?;
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let vars = variables(ctx, def.format, ctx.names.clone(), recorded.clone());
        let mut out = BTreeMap::new();
        for field in &def.fields {
            let key = field.key(name);
            let text = self
                .inner
                .env
                .get_template(&key)
                .and_then(|t| t.render(vars.clone()))
                .map_err(|e| error(format!("{}: {}", field.name(), describe(&e))))?;
            out.insert(field.name(), text);
        }
        let mentioned =
            std::mem::take(&mut *recorded.lock().unwrap_or_else(PoisonError::into_inner));
        finish(def.format, out, mentioned).map_err(error)
    }
}

/// Builds a `Rendered` from the outputs of a render.
fn finish(
    format: Format,
    mut out: BTreeMap<&'static str, String>,
    mentioned: Vec<String>,
) -> Result<Rendered, String> {
    let text = out.remove("text").unwrap_or_default();
    // A TOML multi-line string often leaves blank lines around the text; inner indentation is
    // the author's.
    let text = text.trim_start_matches(['\n', '\r']).trim_end().to_owned();
    if text.is_empty() {
        return Err("text: rendered empty".to_owned());
    }
    let non_empty = |s: Option<String>| {
        s.map(|s| s.trim().to_owned())
            .filter(|s: &String| !s.is_empty())
    };
    let mut mentions = mentioned;
    mentions.extend(split_accounts(&out.remove("mentions").unwrap_or_default()));
    Ok(Rendered {
        title: non_empty(out.remove("title")),
        text,
        url: non_empty(out.remove("url")),
        format,
        mentions: dedup(mentions),
        to: dedup(split_accounts(&out.remove("to").unwrap_or_default())),
    })
}

fn environment(zone: Option<TimeZone>) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // minijinja prints none and booleans as Python does ("none", "True"); payloads are JSON,
    // where null means "nothing" and booleans are spelt true and false.
    env.set_formatter(|out, state, value| {
        if value.is_none() {
            Ok(())
        } else if value.kind() == ValueKind::Bool {
            out.write_str(if value.is_true() { "true" } else { "false" })
                .map_err(Error::from)
        } else {
            minijinja::escape_formatter(out, state, value)
        }
    });
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.add_filter("date", move |value, format, kwargs| {
        date(value, format, kwargs, zone.as_ref())
    });
    env.add_filter("accounts", accounts);
    env.add_filter("strip_html", strip_html);
    env
}

/// The variables of one render, with `link` and `mention` made for it: `link` follows the
/// template's format, `mention` records into this render's list.
fn variables(
    ctx: &Context<'_>,
    format: Format,
    names: Arc<People>,
    recorded: Arc<Mutex<Vec<String>>>,
) -> Value {
    let mut vars: Vec<(String, Value)> = match ctx.payload {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(Serde(v))))
            .collect(),
        _ => Vec::new(),
    };
    // Pushed last, so they win over payload fields of the same name.
    vars.push(("payload".into(), Value::from(Serde(ctx.payload))));
    vars.push(("target".into(), Value::from(ctx.target)));
    vars.push(("kind".into(), Value::from(ctx.kind)));
    vars.push(("route".into(), Value::from(ctx.route)));
    vars.push((
        "link".into(),
        Value::from_function(move |text: Value, url: Option<Value>| {
            link(
                format,
                &text_of(&text),
                &url.map(|u| text_of(&u)).unwrap_or_default(),
            )
        }),
    ));
    let mentioned = names.clone();
    vars.push((
        "mention".into(),
        Value::from_function(move |account: Value| {
            let account = text_of(&account).trim().to_owned();
            if account.is_empty() {
                return String::new();
            }
            let shown = mentioned
                .by_account
                .get(&account)
                .cloned()
                .unwrap_or_else(|| account.clone());
            recorded
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(account);
            format!("@{shown}")
        }),
    ));
    // person(id, platform): who a platform's user id is, by the bindings; the id itself when
    // nobody is bound to it (an unknown person is still named, not hidden).
    vars.push((
        "person".into(),
        Value::from_function(move |id: Value, platform: String| {
            let id = text_of(&id).trim().to_owned();
            let key = (platform.trim().to_ascii_lowercase(), id);
            names.by_id.get(&key).cloned().unwrap_or(key.1)
        }),
    ));
    Value::from_pairs(vars)
}

/// A value as text: undefined and none are empty.
fn text_of(v: &Value) -> String {
    if v.is_undefined() || v.is_none() {
        String::new()
    } else if let Some(s) = v.as_str() {
        s.to_owned()
    } else {
        v.to_string()
    }
}

/// `link(text, url)`: markdown `[text](url)`, or `text url` in a text template; just `text`
/// without a url, and the url itself without a text.
fn link(format: Format, text: &str, url: &str) -> String {
    let (text, url) = (text.trim(), url.trim());
    match (text.is_empty(), url.is_empty(), format) {
        (_, true, _) => text.to_owned(),
        (true, false, _) => url.to_owned(),
        (false, false, Format::Markdown) => format!("[{text}]({url})"),
        (false, false, Format::Text) => format!("{text} {url}"),
    }
}

/// `minijinja::Error` as one line: "syntax error on line 3: unexpected end of input, …".
fn describe(e: &Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(line) = e.line() {
        s.push_str(&format!(" on line {line}"));
    }
    if let Some(detail) = e.detail() {
        s.push_str(": ");
        s.push_str(detail);
    }
    s
}

/// Whether the environment has filter `name` (an identifier): minijinja offers no lookup, but
/// applying an unknown filter fails with its own error kind.
fn filter_exists(env: &Environment<'_>, name: &str) -> bool {
    match env.render_str(&format!("{{{{ none|{name} }}}}"), ()) {
        Err(e) => e.kind() != ErrorKind::UnknownFilter,
        Ok(_) => true,
    }
}

/// The filters a template applies (`x|name`, `{% filter name %}`) with their lines. The exact
/// list is in minijinja's compiled instructions, but those are only reachable through its
/// `unstable_machinery` feature, exempt from semver; the source has already passed the parser,
/// so reading its tags (skipping strings, comments and raw blocks) is enough.
fn used_filters(src: &str) -> Vec<(String, usize)> {
    let b = src.as_bytes();
    let mut found = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1)) {
            (b'{', Some(b'#')) => {
                let end = find(b, i + 2, b"#}").map_or(b.len(), |e| e + 2);
                line += count_lines(&b[i..end]);
                i = end;
            }
            (b'{', Some(b'%')) if tag_word(b, i + 2, b"raw").is_some() => {
                let mut j = i + 2;
                let end = loop {
                    match find(b, j, b"{%") {
                        Some(k) => match tag_word(b, k + 2, b"endraw") {
                            Some(e) => break e,
                            None => j = k + 2,
                        },
                        None => break b.len(),
                    }
                };
                line += count_lines(&b[i..end]);
                i = end;
            }
            (b'{', Some(open @ (b'{' | b'%'))) => {
                i = scan_tag(src, i + 2, *open == b'%', &mut line, &mut found);
            }
            (b'\n', _) => {
                line += 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    found
}

/// Scans the code of a tag starting at `i` for filter names; returns the index after the tag.
fn scan_tag(
    src: &str,
    mut i: usize,
    block: bool,
    line: &mut usize,
    found: &mut Vec<(String, usize)>,
) -> usize {
    let b = src.as_bytes();
    let close: &[u8] = if block { b"%}" } else { b"}}" };
    let mut depth = 0usize;
    let mut first = true;
    let mut expect_filter = false;
    while i < b.len() && matches!(b[i], b'-' | b'+') {
        i += 1;
    }
    while i < b.len() {
        let c = b[i];
        if depth == 0 && b[i..].starts_with(close) {
            return i + 2;
        }
        match c {
            b'\n' => {
                *line += 1;
                i += 1;
            }
            c if c.is_ascii_whitespace() => i += 1,
            b'\'' | b'"' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    if b[i] == b'\n' {
                        *line += 1;
                    }
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                expect_filter = false;
                first = false;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                // Cut at ASCII bytes only, so on character boundaries.
                let word = &src[start..i];
                if expect_filter {
                    found.push((word.to_owned(), *line));
                }
                expect_filter = block && first && word == "filter";
                first = false;
            }
            b'|' => {
                expect_filter = true;
                first = false;
                i += 1;
            }
            _ => {
                match c {
                    b'(' | b'[' | b'{' => depth += 1,
                    b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                    _ => {}
                }
                expect_filter = false;
                first = false;
                i += 1;
            }
        }
    }
    b.len()
}

fn find(b: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    b.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn count_lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}

/// When the block tag whose code starts at `i` is exactly `word` (`{%- raw +%}`), the index
/// after its `%}`.
fn tag_word(b: &[u8], mut i: usize, word: &[u8]) -> Option<usize> {
    let skip = |b: &[u8], mut i: usize| {
        while i < b.len() && (b[i].is_ascii_whitespace() || matches!(b[i], b'-' | b'+')) {
            i += 1;
        }
        i
    };
    i = skip(b, i);
    if !b.get(i..)?.starts_with(word) {
        return None;
    }
    i = skip(b, i + word.len());
    b.get(i..)?.starts_with(b"%}").then_some(i + 2)
}

/// Filter `date(format="%Y-%m-%d %H:%M", tz="Asia/Shanghai")`. Reads ZenTao's
/// "2024-01-01 10:00:00", "2024-01-01", RFC 3339 and unix seconds or milliseconds (numbers, or
/// strings of 9 to 13 digits). Anything else comes back unchanged: a date the sender formatted
/// its own way is still worth showing.
///
/// Where it is shown: in `tz` when given, else in `[notify] timezone` (`zone`) when set, else
/// as before either existed: unix times in UTC, RFC 3339 in the offset it was written with.
/// ZenTao's times carry no zone (they are the ZenTao server's wall clock), so there is nothing
/// to convert from: they are shown as written whatever the zone.
///
/// Parsing, calendars, zones (jiff's bundled tz database, so no /usr/share/zoneinfo needed)
/// and strftime are jiff's; only which directives are honoured is decided here ([`strftime`]).
fn date(
    value: Value,
    format: Option<String>,
    kwargs: Kwargs,
    zone: Option<&TimeZone>,
) -> Result<Value, Error> {
    let keyword: Option<String> = kwargs.get("format")?;
    let tz: Option<String> = kwargs.get("tz")?;
    kwargs.assert_all_used()?;
    let format = keyword
        .or(format)
        .unwrap_or_else(|| "%Y-%m-%d %H:%M".to_owned());
    let named = match tz {
        Some(name) => {
            Some(time_zone(&name).map_err(|m| Error::new(ErrorKind::InvalidOperation, m))?)
        }
        None => None,
    };
    let Some(when) = read_time(&value) else {
        return Ok(value);
    };
    let format = strftime(&format);
    let shown = match (when, named.as_ref().or(zone)) {
        (When::Wall(dt), _) => jiff::fmt::strtime::format(&format, dt),
        (When::At(ts, _), Some(zone)) => {
            jiff::fmt::strtime::format(&format, &ts.to_zoned_datetime(zone.clone()))
        }
        (When::At(ts, offset), None) => {
            let zdt = ts.to_zoned_datetime(TimeZone::fixed(offset));
            jiff::fmt::strtime::format(&format, &zdt)
        }
    };
    shown
        .map(Value::from)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// The zone named `name` (IANA, e.g. "Asia/Shanghai"), from the tz database bundled in the
/// binary. The error names the zone: a zone name is not a secret.
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    jiff::tz::db().get(name).map_err(|_| {
        format!("unknown time zone {name:?} (expected an IANA name such as \"Asia/Shanghai\")")
    })
}

/// A time read from a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    /// A wall-clock time without a zone (ZenTao's): shown as written.
    Wall(DateTime),
    /// An instant, and the offset it was written with (UTC for unix times).
    At(Timestamp, Offset),
}

/// Values of 10^11 and more are read as milliseconds: as seconds they would be past year 5000.
const MILLIS_FROM: i64 = 100_000_000_000;

fn read_time(v: &Value) -> Option<When> {
    match v.kind() {
        ValueKind::Number => {
            let n = match v.as_i64() {
                Some(n) => n,
                None => {
                    let f = f64::try_from(v.clone()).ok()?;
                    // Truncation is the point: a fraction of a second is not shown.
                    (f.is_finite() && f >= 0.0 && f < i64::MAX as f64).then_some(f as i64)?
                }
            };
            from_unix(n)
        }
        ValueKind::String => parse_time(v.as_str()?.trim()),
        _ => None,
    }
}

fn from_unix(n: i64) -> Option<When> {
    if n < 0 {
        return None;
    }
    let ts = if n >= MILLIS_FROM {
        // Whole seconds, as the filter has always shown them.
        Timestamp::from_second(n / 1000)
    } else {
        Timestamp::from_second(n)
    };
    Some(When::At(ts.ok()?, Offset::UTC))
}

/// ZenTao's and RFC 3339's shapes, read by jiff. Only strings starting `YYYY-MM-DD` are handed
/// to it: jiff's parser also takes compact and annotated forms ("20240101",
/// "…[Asia/Shanghai]"), and a payload string that merely looks like those was never a date
/// here.
fn parse_time(s: &str) -> Option<When> {
    let b = s.as_bytes();
    if (9..=13).contains(&b.len()) && b.iter().all(u8::is_ascii_digit) {
        return from_unix(s.parse().ok()?);
    }
    let shape = b.len() >= 10
        && b[..10].iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    if !shape || s.contains('[') {
        return None;
    }
    let pieces = jiff::fmt::temporal::Pieces::parse(s).ok()?;
    let time = pieces.time().unwrap_or(jiff::civil::Time::midnight());
    let wall = pieces.date().to_datetime(time);
    match pieces.to_numeric_offset() {
        None => Some(When::Wall(wall)),
        Some(offset) => Some(When::At(offset.to_timestamp(wall).ok()?, offset)),
    }
}

/// `fmt` for jiff's strftime, honouring the directives this filter has always honoured (%Y %m
/// %d %H %M %S %y %b %a %%) and keeping any other `%x` as written, as it always has (jiff
/// would refuse some and read others differently).
fn strftime(fmt: &str) -> String {
    let mut out = String::with_capacity(fmt.len() + 4);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(d @ ('Y' | 'y' | 'm' | 'd' | 'H' | 'M' | 'S' | 'b' | 'a' | '%')) => {
                out.push('%');
                out.push(d);
            }
            Some(other) => {
                out.push_str("%%");
                out.push(other);
            }
            None => out.push_str("%%"),
        }
    }
    out
}

/// The zones templates name literally (`tz="Asia/Shanghai"` inside a tag), checked when they
/// compile; a zone that comes from a variable can only be checked when it renders.
fn literal_zones(src: &str) -> Vec<String> {
    let mut zones = Vec::new();
    for (open, close) in [("{{", "}}"), ("{%", "%}")] {
        let mut rest = src;
        while let Some(i) = rest.find(open) {
            let tag = &rest[i + 2..];
            let end = tag.find(close).unwrap_or(tag.len());
            zones.extend(tz_arguments(&tag[..end]));
            rest = &tag[end..];
        }
    }
    zones
}

/// The string values of `tz=` in one tag.
fn tz_arguments(tag: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = tag;
    while let Some(i) = rest.find("tz") {
        let before = rest[..i].chars().next_back();
        let after = rest[i + 2..].trim_start();
        rest = &rest[i + 2..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(value) = after.strip_prefix('=') else {
            continue;
        };
        let value = value.trim_start();
        let Some(quote) = value.chars().next().filter(|q| matches!(q, '"' | '\'')) else {
            continue;
        };
        if let Some(end) = value[1..].find(quote) {
            found.push(value[1..1 + end].to_owned());
        }
    }
    found
}

/// Filter `accounts`: ",zhangsan,lisi," (ZenTao's mailto), "a, b" or a list → the non-empty,
/// trimmed names, each once.
fn accounts(value: Value) -> Result<Value, Error> {
    let names = match value.kind() {
        ValueKind::Undefined | ValueKind::None => Vec::new(),
        ValueKind::String | ValueKind::Number => split_accounts(&text_of(&value)),
        ValueKind::Seq | ValueKind::Iterable => {
            let mut names = Vec::new();
            for item in value.try_iter()? {
                names.extend(split_accounts(&text_of(&item)));
            }
            names
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("accounts expects a string or a list, not {other}"),
            ))
        }
    };
    Ok(Value::from_iter(dedup(names)))
}

/// Account names separated by commas (also full-width), semicolons or whitespace. Brackets and
/// quotes around names are dropped, so a printed list (`["a", "b"]`) reads as its names.
fn split_accounts(s: &str) -> Vec<String> {
    s.split(|c: char| matches!(c, ',' | '，' | ';') || c.is_whitespace())
        .map(|name| name.trim_matches(|c| matches!(c, '[' | ']' | '"' | '\'')))
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

fn dedup(names: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    names
        .into_iter()
        .filter(|n| seen.insert(n.clone()))
        .collect()
}

/// Filter `strip_html`: ZenTao comments come from a rich-text editor. Tags are removed (line
/// breaking ones become newlines), common entities decoded; undefined and none stay as they are.
fn strip_html(value: Value) -> Value {
    if value.is_undefined() || value.is_none() {
        return value;
    }
    Value::from(html_to_text(&text_of(&value)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn zentao() -> serde_json::Value {
        json!({
            "objectType": "bug", "objectID": "12", "product": ",1,", "execution": "3",
            "action": "opened", "actor": "zhangsan", "date": "2024-01-01 10:00:00",
            "comment": "<p>x&nbsp;y</p>",
            "text": "张三创建了Bug [#12::Login fails](https://zentao.example.com/bug-view-12.html)",
            "assignedTo": "lisi", "mailto": ",wangwu,zhaoliu,"
        })
    }

    static NAMES: std::sync::LazyLock<Arc<People>> = std::sync::LazyLock::new(|| {
        Arc::new(People {
            by_account: HashMap::from([
                ("lisi".to_owned(), "李四".to_owned()),
                ("wangwu".to_owned(), "王五".to_owned()),
            ]),
            by_id: HashMap::from([(
                ("dingtalk".to_owned(), "manager75".to_owned()),
                "李四".to_owned(),
            )]),
        })
    });

    fn ctx(payload: &serde_json::Value) -> Context<'_> {
        Context {
            payload,
            target: "dev-group",
            kind: "dingtalk_robot",
            route: Some("bugs"),
            names: &NAMES,
        }
    }

    fn one(def: TemplateConfig) -> Result<Templates, Vec<(String, String)>> {
        Templates::compile(&BTreeMap::from([("t".to_owned(), def)]))
    }

    fn text(source: &str) -> TemplateConfig {
        TemplateConfig {
            text: source.to_owned(),
            ..Default::default()
        }
    }

    /// Renders a one-line text template against `payload`.
    fn eval(source: &str, payload: serde_json::Value) -> Result<String, String> {
        let t = one(text(source)).map_err(|e| format!("{e:?}"))?;
        t.render("t", &ctx(&payload))
            .map(|r| r.text)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn zentao_payload() {
        let def = TemplateConfig {
            title: Some("{{ objectType }} #{{ objectID }} {{ action }} by {{ actor }}".into()),
            text: r#"
{{ payload.text }}
{{ link("Bug #" ~ objectID, url) }}
指派给 {{ mention(assignedTo) }}，抄送 {{ mention("zhaoliu") }}
{{ date|date }} / {{ date|date("%a %d %b %y %H:%M:%S %%") }} / {{ date|date(format="%Y") }}
> {{ comment|strip_html }}
[{{ payload.missing.deeper }}{{ nothing }}] {{ target }} {{ kind }} {{ route }}
"#
            .into(),
            url: Some(
                "https://zentao.example.com/{{ objectType }}-view-{{ objectID }}.html".into(),
            ),
            mentions: Some("{{ mailto|accounts }}".into()),
            to: Some("{{ assignedTo }} {{ mailto }}".into()),
            ..Default::default()
        };
        let t = one(def).unwrap();
        assert!(t.contains("t") && !t.contains("u"));
        let payload = json!({"url": "https://zentao.example.com/bug-view-12.html"});
        let mut z = zentao();
        z.as_object_mut()
            .unwrap()
            .extend(payload.as_object().unwrap().clone());
        let r = t.render("t", &ctx(&z)).unwrap();
        assert_eq!(r.title.as_deref(), Some("bug #12 opened by zhangsan"));
        assert_eq!(
            r.text,
            "张三创建了Bug [#12::Login fails](https://zentao.example.com/bug-view-12.html)\n\
             [Bug #12](https://zentao.example.com/bug-view-12.html)\n\
             指派给 @李四，抄送 @zhaoliu\n\
             2024-01-01 10:00 / Mon 01 Jan 24 10:00:00 % / 2024\n\
             > x y\n\
             [] dev-group dingtalk_robot bugs"
        );
        assert_eq!(
            r.url.as_deref(),
            Some("https://zentao.example.com/bug-view-12.html")
        );
        assert_eq!(r.format, Format::Markdown);
        assert_eq!(r.mentions, ["lisi", "zhaoliu", "wangwu"]);
        assert_eq!(r.to, ["lisi", "wangwu", "zhaoliu"]);
    }

    #[test]
    fn text_format_link() {
        let def = TemplateConfig {
            format: Format::Text,
            ..text(
                r#"{{ link("Bug", "https://x/1") }}|{{ link("Bug", missing) }}|{{ link("", "https://x/2") }}"#,
            )
        };
        let r = one(def).unwrap().render("t", &ctx(&zentao())).unwrap();
        assert_eq!(r.text, "Bug https://x/1|Bug|https://x/2");
        assert_eq!(r.format, Format::Text);
        assert_eq!(
            link(Format::Markdown, "Bug", "https://x/1"),
            "[Bug](https://x/1)"
        );
    }

    #[test]
    fn empty_title_and_url_are_none_and_null_is_empty() {
        let def = TemplateConfig {
            title: Some("  {{ nothing }} ".into()),
            url: Some("{{ gone }}\n".into()),
            ..text("a{{ payload.none }}{{ none }}b")
        };
        let r = one(def)
            .unwrap()
            .render("t", &ctx(&json!({"none": null})))
            .unwrap();
        assert_eq!((r.title, r.url, r.text.as_str()), (None, None, "ab"));
        assert!(r.mentions.is_empty() && r.to.is_empty());
    }

    #[test]
    fn empty_text_is_an_error() {
        let t = one(text("{% if false %}x{% endif %}\n  \n")).unwrap();
        let e = t.render("t", &ctx(&zentao())).unwrap_err();
        assert_eq!(e.name, "t");
        assert!(e.message.contains("empty"), "{e}");
        let errs = one(text("  ")).unwrap_err();
        assert_eq!(errs[0].0, "templates.t.text");
    }

    #[test]
    fn unknown_template_is_an_error() {
        let t = one(text("x")).unwrap();
        assert_eq!(
            t.render("other", &ctx(&zentao())).unwrap_err().name,
            "other"
        );
    }

    #[test]
    fn syntax_errors_name_key_and_line() {
        let defs = BTreeMap::from([
            (
                "a".to_owned(),
                TemplateConfig {
                    title: Some("{{ objectType }".into()),
                    to: Some("\n\n{% for x in y %}".into()),
                    ..text("one\ntwo\n{{ three ")
                },
            ),
            ("b".to_owned(), text("fine {{ x }}")),
        ]);
        let errs = Templates::compile(&defs).unwrap_err();
        let keys: Vec<_> = errs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["templates.a.title", "templates.a.text", "templates.a.to"]
        );
        assert!(errs[0].1.starts_with("syntax error on line 1"), "{errs:?}");
        assert!(errs[1].1.starts_with("syntax error on line 3"), "{errs:?}");
        assert!(errs[2].1.starts_with("syntax error on line 3"), "{errs:?}");
    }

    #[test]
    fn unknown_filters_fail_compile() {
        let errs = one(TemplateConfig {
            url: Some("{{ x|upper }}\n{{ x|default('a|nope')|nope }}".into()),
            ..text("{% if x %}\n{{ x | trim | datee }}{% endif %}{% filter nix %}y{% endfilter %}")
        })
        .unwrap_err();
        assert_eq!(
            errs,
            [
                (
                    "templates.t.text".to_owned(),
                    "unknown filter datee on line 2".to_owned()
                ),
                (
                    "templates.t.text".to_owned(),
                    "unknown filter nix on line 2".to_owned()
                ),
                (
                    "templates.t.url".to_owned(),
                    "unknown filter nope on line 2".to_owned()
                ),
            ]
        );
        // Strings, comments and raw blocks hold no filters; our filters and the built-ins exist.
        one(text(
            "{# x|a #}{% raw %}{{ x|b }}{% endraw %}{{ '|c' ~ \"|d\" }}{{ {'k': x|upper}|length }}\
             {{ x|date|accounts|strip_html|join(',')|default('') }}",
        ))
        .unwrap();
    }

    #[test]
    fn render_errors() {
        let e = eval("{{ payload|accounts }}", zentao()).unwrap_err();
        assert!(e.contains("accounts expects a string or a list"), "{e}");
        let t = one(text("ok\n{{ 1 + actor }}")).unwrap();
        let e = t.render("t", &ctx(&zentao())).unwrap_err();
        assert_eq!(e.name, "t");
        assert!(e.message.starts_with("text: "), "{e}");
        assert!(e.message.contains("line 2"), "{e}");
    }

    #[test]
    fn fuel_stops_runaway_templates() {
        let started = std::time::Instant::now();
        let e = eval(
            "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}",
            zentao(),
        )
        .unwrap_err();
        assert!(e.contains("fuel"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn date_filter() {
        let cases = [
            (json!("2024-01-01 10:00:00"), "2024-01-01 10:00"),
            (json!("2024-01-01"), "2024-01-01 00:00"),
            (json!("2024-01-01T10:00:05+08:00"), "2024-01-01 10:00"),
            (json!("2024-02-29t23:59:59.123Z"), "2024-02-29 23:59"),
            (json!(1704103200), "2024-01-01 10:00"),
            (json!(1704103200000_i64), "2024-01-01 10:00"),
            (json!(1704103200.9), "2024-01-01 10:00"),
            (json!("1704103200"), "2024-01-01 10:00"),
            (json!("1704103200000"), "2024-01-01 10:00"),
            // Unreadable: unchanged.
            (json!("0000-00-00 00:00:00"), "0000-00-00 00:00:00"),
            (json!("2023-02-29"), "2023-02-29"),
            (json!("2024-01-01 25:00"), "2024-01-01 25:00"),
            (json!("2024-01-01T10:00:00+8"), "2024-01-01T10:00:00+8"),
            (json!("tomorrow"), "tomorrow"),
            (json!("2024"), "2024"),
            (json!(-5), "-5"),
            (json!(null), ""),
            (json!(true), "true"),
        ];
        for (value, want) in cases {
            let got = eval("{{ d|date }}", json!({ "d": value })).unwrap_or_default();
            assert_eq!(got, want, "{value}");
        }
        assert_eq!(
            eval("{{ d|date('%a %b %y|%Q|%') }}", json!({"d": "2024-02-29"})).unwrap(),
            "Thu Feb 24|%Q|%"
        );
        assert_eq!(eval("{{ missing|date }}x", json!({})).unwrap(), "x");
        assert!(eval("{{ d|date(fmt='%Y') }}", json!({"d": 1})).is_err());
        // The calendar across centuries and leap days (formerly hand-written arithmetic).
        for (secs, want) in [
            (0_i64, "1970-01-01 00:00:00 Thu"),
            (951_782_400, "2000-02-29 00:00:00 Tue"),
            (4_107_542_399, "2100-02-28 23:59:59 Sun"),
            (32_503_679_999, "2999-12-31 23:59:59 Tue"),
        ] {
            let got = eval("{{ d|date('%Y-%m-%d %H:%M:%S %a') }}", json!({ "d": secs }));
            assert_eq!(got.unwrap(), want, "{secs}");
        }
    }

    fn eval_in(
        zone: Option<&str>,
        source: &str,
        payload: serde_json::Value,
    ) -> Result<String, String> {
        let zone = zone.map(|z| time_zone(z).unwrap());
        let templates =
            Templates::compile_in(&BTreeMap::from([("t".to_owned(), text(source))]), zone)
                .map_err(|e| format!("{e:?}"))?;
        templates
            .render("t", &ctx(&payload))
            .map(|r| r.text)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn date_filter_shows_times_in_a_zone() {
        // 2024-03-10 06:59:59Z is 01:59:59 EST; a second later New York jumps to 03:00 EDT.
        let before = 1_710_053_999_i64;
        let ny = "{{ d|date('%Y-%m-%d %H:%M:%S', tz='America/New_York') }}";
        assert_eq!(
            eval(ny, json!({ "d": before })).unwrap(),
            "2024-03-10 01:59:59"
        );
        assert_eq!(
            eval(ny, json!({ "d": before + 1 })).unwrap(),
            "2024-03-10 03:00:00"
        );
        // And back in November: 05:30Z is 01:30 EDT, 06:30Z 01:30 EST.
        let nov = json!({ "a": "2024-11-03T05:30:00Z", "b": "2024-11-03T06:30:00Z" });
        let both = "{{ a|date(tz='America/New_York') }}|{{ b|date(tz='America/New_York') }}";
        assert_eq!(
            eval(both, nov).unwrap(),
            "2024-11-03 01:30|2024-11-03 01:30"
        );

        // Unix seconds and milliseconds, RFC 3339 from any offset, into Shanghai (UTC+8).
        let sh = "{{ d|date(tz=\"Asia/Shanghai\") }}";
        for value in [
            json!(1_704_103_200),
            json!(1_704_103_200_000_i64),
            json!("1704103200"),
            json!("2024-01-01T10:00:00Z"),
            json!("2024-01-01T05:00:00-05:00"),
        ] {
            assert_eq!(
                eval(sh, json!({ "d": value })).unwrap(),
                "2024-01-01 18:00",
                "{value}"
            );
        }
        // ZenTao's wall-clock times carry no zone: shown as written.
        assert_eq!(
            eval(sh, json!({ "d": "2024-01-01 10:00:00" })).unwrap(),
            "2024-01-01 10:00"
        );

        // [notify] timezone is the default; a template's own tz wins; unset keeps UTC and
        // the RFC 3339 offset as written.
        let d = json!({ "d": 1_704_103_200, "r": "2024-01-01T10:00:05+08:00" });
        let src = "{{ d|date }} {{ r|date }} {{ d|date(tz='UTC') }}";
        assert_eq!(
            eval_in(Some("Asia/Shanghai"), src, d.clone()).unwrap(),
            "2024-01-01 18:00 2024-01-01 10:00 2024-01-01 10:00"
        );
        assert_eq!(
            eval_in(Some("America/New_York"), src, d.clone()).unwrap(),
            "2024-01-01 05:00 2023-12-31 21:00 2024-01-01 10:00"
        );
        assert_eq!(
            eval_in(None, src, d).unwrap(),
            "2024-01-01 10:00 2024-01-01 10:00 2024-01-01 10:00"
        );
    }

    #[test]
    fn unknown_zones_fail_at_compile_when_literal_and_at_render_otherwise() {
        let errs = one(text("{{ d | date('%H', tz = \"Mars/Olympus\") }}")).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, "templates.t.text");
        assert!(errs[0].1.contains("Mars/Olympus"), "{errs:?}");
        let err = eval("{{ d|date(tz=z) }}", json!({"d": 1, "z": "Nowhere/City"})).unwrap_err();
        assert!(err.contains("Nowhere/City"), "{err}");
        // Text that merely mentions tz= outside a tag is text.
        assert_eq!(eval("tz='x' {{ 1 }}", json!({})).unwrap(), "tz='x' 1");
        assert_eq!(
            literal_zones("{% set a = b|date(tz='Asia/Tokyo') %}{{ c|date(tz=\"UTC\") }}"),
            ["UTC", "Asia/Tokyo"]
        );
    }

    #[test]
    fn accounts_filter() {
        let p = json!({"m": ",zhangsan,lisi,", "s": " a, b ，c;a ", "l": ["x", " y ", "", 7], "n": null});
        assert_eq!(
            eval(
                "{{ m|accounts|join('+') }}/{{ s|accounts|join('+') }}/{{ l|accounts|join('+') }}/\
                 {{ n|accounts|length }}{{ missing|accounts|length }}",
                p
            )
            .unwrap(),
            "zhangsan+lisi/a+b+c/x+y+7/00"
        );
        assert_eq!(split_accounts(r#"["a", 'b']"#), ["a", "b"]);
    }

    #[test]
    fn strip_html_filter() {
        let cases = [
            ("<p>x&nbsp;y</p>", "x y"),
            (
                "<p>a</p><p><br></p><p><br /></p><p>b &amp;lt; &#39;c&#x27;</p>",
                "a\n\nb &lt; 'c'",
            ),
            (
                "a < b & c &unknown; <b>bold</b>",
                "a < b & c &unknown; bold",
            ),
            ("<ul><li>one</li><li>two</li></ul>", "one\ntwo"),
            ("unclosed <a href", "unclosed <a href"),
        ];
        for (html, want) in cases {
            assert_eq!(html_to_text(html), want, "{html}");
        }
        assert_eq!(
            eval(
                "[{{ comment|strip_html }}][{{ missing|strip_html }}]",
                zentao()
            )
            .unwrap(),
            "[x y][]"
        );
    }

    #[test]
    fn concurrent_renders_keep_their_own_mentions() {
        let def = TemplateConfig {
            mentions: Some("{{ extra }}".into()),
            ..text("{{ mention(assignedTo) }} {{ mention(actor) }}")
        };
        let t = one(def).unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let t = t.clone();
                    s.spawn(move || {
                        for j in 0..50 {
                            let p = json!({
                                "assignedTo": format!("u{i}"),
                                "actor": format!("a{i}-{j}"),
                                "extra": "lisi"
                            });
                            let r = t.render("t", &ctx(&p)).unwrap();
                            assert_eq!(r.text, format!("@u{i} @a{i}-{j}"));
                            assert_eq!(
                                r.mentions,
                                [format!("u{i}"), format!("a{i}-{j}"), "lisi".into()]
                            );
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        });
    }

    #[test]
    fn mention_shows_bound_names() {
        assert_eq!(
            eval(
                "{{ mention('lisi') }} {{ mention(' wangwu ') }} {{ mention('nobody') }}[{{ mention(missing) }}]",
                json!({})
            )
            .unwrap(),
            "@李四 @王五 @nobody[]"
        );
    }

    #[test]
    fn person_names_a_platform_user_by_the_bindings() {
        assert_eq!(
            eval(
                "{{ person(staffId, 'dingtalk') }} {{ person('manager75', 'DingTalk') }} {{ person(staffId, 'wecom') }} {{ person('u9', 'dingtalk') }}",
                json!({"staffId": "manager75"})
            )
            .unwrap(),
            "李四 李四 manager75 u9"
        );
    }

    #[test]
    fn config_deserializes() {
        let def: TemplateConfig =
            serde_json::from_value(json!({"text": "x", "format": "text", "to": "{{ a }}"}))
                .unwrap();
        assert_eq!(def.format, Format::Text);
        assert_eq!(def.to.as_deref(), Some("{{ a }}"));
        assert!(serde_json::from_value::<TemplateConfig>(json!({"text": "x", "body": 1})).is_err());
        assert!(serde_json::from_value::<TemplateConfig>(json!({"title": "x"})).is_err());
    }
}
