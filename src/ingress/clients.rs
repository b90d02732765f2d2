//! The internal systems allowed on the internal listener (`[clients.<name>]`): who a request
//! comes from, by its bearer token, and what that client may do.

use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// One internal system.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    pub token: Secret,
    /// Globs (`*` any run of characters, `?` one) over target and route names.
    pub targets: Vec<String>,
    /// May name recipients itself (`to`, `mentions.user_ids`, `mentions.mobiles`).
    pub allow_recipients: bool,
    /// May send platform-native `raw` bodies.
    pub allow_raw: bool,
    /// Globs over `<platform>/<app>/<normalised path>` of the platform APIs it may call
    /// through `/api` (`*` also spans `/`).
    pub api: Vec<String>,
}

impl Client {
    /// Whether this client may send to the target or route `name`.
    pub fn may_use(&self, name: &str) -> bool {
        self.targets.iter().any(|glob| glob_matches(glob, name))
    }

    /// Whether this client may call `<platform>/<app>/<path>` (the path normalised first).
    pub fn may_call(&self, path: &str) -> bool {
        self.api.iter().any(|glob| glob_matches(glob, path))
    }
}

/// Every configured client, and whether requests without a token are let in.
#[derive(Debug, Clone, Default)]
pub struct Clients {
    pub clients: Vec<Client>,
    /// `server.allow_anonymous`: a request without any token acts as a client allowed
    /// everything (never a request with a wrong token).
    pub anonymous: bool,
}

/// Who a request is, or why it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No token given.
    Missing,
    /// A token no client has.
    Wrong,
}

impl Clients {
    /// The client holding `token`. Every client's token is compared, each in constant time,
    /// so the time taken tells nothing about which (or how much of one) matched.
    /// The client named `name`.
    pub fn find(&self, name: &str) -> Option<&Client> {
        self.clients.iter().find(|c| c.name == name)
    }

    pub fn authenticate(&self, token: Option<&str>) -> Result<Client, Denied> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return match self.anonymous {
                true => Ok(Client {
                    name: "anonymous".into(),
                    token: Secret::default(),
                    targets: vec!["*".into()],
                    allow_recipients: true,
                    allow_raw: true,
                    // The API gateway spends the apps' tokens and quotas: never anonymously.
                    api: Vec::new(),
                }),
                false => Err(Denied::Missing),
            };
        };
        let mut found = None;
        for client in &self.clients {
            let equal: bool = client
                .token
                .expose()
                .as_bytes()
                .ct_eq(token.as_bytes())
                .into();
            if equal {
                found = Some(client);
            }
        }
        found.cloned().ok_or(Denied::Wrong)
    }
}

/// Whether `name` matches `glob`: `*` stands for any run of characters, `?` for one.
pub fn glob_matches(glob: &str, name: &str) -> bool {
    let (g, n): (Vec<char>, Vec<char>) = (glob.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point: linear in practice, never exponential.
    let (mut gi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match g.get(gi) {
            Some('*') => {
                star = Some((gi, ni));
                gi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                gi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sg, sn)) => {
                    gi = sg + 1;
                    ni = sn + 1;
                    star = Some((sg, sn + 1));
                }
                None => return false,
            },
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, token: &str, targets: &[&str]) -> Client {
        Client {
            name: name.into(),
            token: Secret::new(token),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            allow_recipients: false,
            allow_raw: false,
            api: vec!["dingtalk/main/topapi/v2/user/*".into()],
        }
    }

    #[test]
    fn globs() {
        assert!(glob_matches("ops-*", "ops-dingtalk"));
        assert!(glob_matches("ops-*", "ops-"));
        assert!(!glob_matches("ops-*", "dev-ops"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("a?c", "abc"));
        assert!(!glob_matches("a?c", "ac"));
        assert!(glob_matches("*-wecom*", "dev-wecom-app"));
        assert!(glob_matches("dev-wecom", "dev-wecom"));
        assert!(!glob_matches("dev-wecom", "dev-wecom2"));
        // Hostile input stays fast.
        let long = "a".repeat(10_000);
        assert!(!glob_matches("*a*a*a*a*a*b", &long));
    }

    #[test]
    fn tokens_pick_their_client_and_nothing_else() {
        let clients = Clients {
            clients: vec![
                client("zentao", "zentao-token-0123456789", &["zentao-*"]),
                client("ci", "ci-token-0123456789abcdef", &["ops"]),
            ],
            anonymous: false,
        };
        let ci = clients
            .authenticate(Some("ci-token-0123456789abcdef"))
            .unwrap();
        assert_eq!(ci.name, "ci");
        assert!(ci.may_use("ops") && !ci.may_use("zentao-x"));
        assert!(ci.may_call("dingtalk/main/topapi/v2/user/get"));
        assert!(!ci.may_call("dingtalk/main/topapi/message/send"));
        assert_eq!(clients.authenticate(None).unwrap_err(), Denied::Missing);
        assert_eq!(clients.authenticate(Some("")).unwrap_err(), Denied::Missing);
        assert_eq!(
            clients
                .authenticate(Some("ci-token-0123456789abcde"))
                .unwrap_err(),
            Denied::Wrong
        );
        let open = Clients {
            anonymous: true,
            ..clients
        };
        assert!(open.authenticate(None).unwrap().may_use("anything"));
        assert!(!open.authenticate(None).unwrap().may_call("dingtalk/main/x"));
        assert_eq!(open.authenticate(Some("nope")).unwrap_err(), Denied::Wrong);
    }
}
