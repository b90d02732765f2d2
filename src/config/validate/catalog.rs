//! What targets and routes refer to: `[templates.<name>]`, `[users.<account>]`, and the
//! shaping keys (template, recipients, mention, exclude_actor) both of them take.

use std::collections::BTreeMap;

use super::checker::Checker;
use crate::config::raw::{TemplateConfig, UserConfig};
use crate::message::UserBinding;
use crate::notify::target::Composition;
use crate::notify::template::{self, Templates};

/// The templates, their `date` filter showing times in `zone` (`[notify] timezone`) by default.
pub(super) fn templates(
    raw: &BTreeMap<String, TemplateConfig>,
    zone: Option<jiff::tz::TimeZone>,
    c: &mut Checker,
) -> Templates {
    let defs = raw
        .iter()
        .map(|(name, t)| {
            let def = template::TemplateConfig {
                title: t.title.clone(),
                // A missing text is reported as an empty one.
                text: t.text.clone().unwrap_or_default(),
                url: t.url.clone(),
                format: t.format,
                mentions: t.mentions.clone(),
                to: t.to.clone(),
            };
            (name.clone(), def)
        })
        .collect();
    match Templates::compile_in(&defs, zone) {
        Ok(t) => t,
        Err(errors) => {
            for (key, message) in errors {
                c.problem(key, message);
            }
            Templates::default()
        }
    }
}

pub(super) fn users(
    raw: &BTreeMap<String, UserConfig>,
    c: &mut Checker,
) -> BTreeMap<String, UserBinding> {
    let mut out = BTreeMap::new();
    for (account, u) in raw {
        let ids = [&u.dingtalk, &u.wecom, &u.lark, &u.mobile, &u.email];
        if ids
            .iter()
            .all(|v| v.as_deref().is_none_or(|v| v.trim().is_empty()))
        {
            c.problem(
                format!("users.{account}"),
                "binds no id: set dingtalk, wecom, lark, mobile or email",
            );
        }
        let binding = UserBinding {
            name: u.name.clone(),
            dingtalk: u.dingtalk.clone(),
            wecom: u.wecom.clone(),
            lark: u.lark.clone(),
            mobile: u.mobile.clone(),
            email: u.email.clone(),
        };
        out.insert(account.clone(), binding);
    }
    out
}

/// The shaping keys of a target or a route rule, as written.
pub(super) struct Shaping<'a> {
    pub template: Option<&'a String>,
    pub recipients: &'a [String],
    pub mention: &'a [String],
    pub exclude_actor: Option<bool>,
}

impl Shaping<'_> {
    /// Reports a template that does not exist and empty field names, under `key`.
    pub fn check(&self, key: &str, templates: &Templates, c: &mut Checker) {
        if let Some(t) = self.template {
            if !templates.contains(t) {
                c.problem(
                    format!("{key}.template"),
                    format!("no [templates.{t}] is configured"),
                );
            }
        }
        for (field, names) in [("recipients", self.recipients), ("mention", self.mention)] {
            if names.iter().any(|n| n.trim().is_empty()) {
                c.problem(format!("{key}.{field}"), "field names must not be empty");
            }
        }
    }

    pub fn composition(&self) -> Composition {
        Composition {
            template: self.template.cloned(),
            recipients: self.recipients.to_vec(),
            mention: self.mention.to_vec(),
            exclude_actor: self.exclude_actor,
        }
    }
}
