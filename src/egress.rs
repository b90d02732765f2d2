//! How outbound platform calls leave the process: directly, or through an HTTP(S) proxy
//! named in the config (`[http] proxy`, overridden per target and per app).
//!
//! Only the config decides: the usual `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY`
//! environment variables are never read, so a variable set for some other tool in the same
//! container cannot quietly send platform credentials through a host nobody chose. The one
//! client builder (`notify::http::client`) applies an [`Egress`] to every client it builds.

use std::fmt;

/// Where a client's requests go: straight to the platform, or through a proxy.
///
/// The proxy URL may carry credentials (`http://user:pass@proxy:3128`): `Debug` masks it,
/// and nothing prints it.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub enum Egress {
    /// Straight to the platform, whatever the environment says.
    #[default]
    Direct,
    /// Through `url` (`http://` or `https://`), except for the hosts `no_proxy` names.
    Proxy { url: String, no_proxy: Vec<String> },
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Egress::Direct => f.write_str("Direct"),
            Egress::Proxy { no_proxy, .. } => f
                .debug_struct("Proxy")
                .field("url", &"***")
                .field("no_proxy", no_proxy)
                .finish(),
        }
    }
}

/// Why a proxy setting was refused. The messages never quote the URL (it may hold a
/// password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("is not a URL (expected http://host:port or https://host:port)")]
    NotUrl,
    #[error("must be an http:// or https:// URL (socks is not supported by this build)")]
    Scheme,
    #[error("must name a host")]
    NoHost,
    #[error("must be a URL without a path, query or fragment")]
    Path,
}

impl Egress {
    /// A proxy at `url` (checked), skipped for the hosts `no_proxy` names.
    pub fn proxy(url: &str, no_proxy: &[String]) -> Result<Egress, EgressError> {
        check_url(url)?;
        Ok(Egress::Proxy {
            url: url.to_owned(),
            no_proxy: no_proxy.to_vec(),
        })
    }

    /// Whether requests go through a proxy.
    pub fn is_proxied(&self) -> bool {
        matches!(self, Egress::Proxy { .. })
    }

    /// `builder`, sending through this egress and never through a proxy the environment
    /// names. `reqwest` reads the environment unless told otherwise: `no_proxy()` turns that
    /// off, and adding a proxy turns it off too.
    pub fn apply(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, reqwest::Error> {
        match self {
            Egress::Direct => Ok(builder.no_proxy()),
            Egress::Proxy { url, no_proxy } => {
                let skip = reqwest::NoProxy::from_string(&no_proxy.join(","));
                Ok(builder.proxy(reqwest::Proxy::all(url)?.no_proxy(skip)))
            }
        }
    }
}

/// An `http://` or `https://` URL naming a host, with nothing after the port. reqwest's own
/// parse accepts more (a path it ignores, schemes it was not built for), and says why with
/// the URL in the message.
fn check_url(raw: &str) -> Result<(), EgressError> {
    let url = reqwest::Url::parse(raw.trim()).map_err(|_| EgressError::NotUrl)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(EgressError::Scheme);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(EgressError::NoHost);
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(EgressError::Path);
    }
    Ok(())
}

/// Whether `entry` is something `reqwest::NoProxy` matches on: a host name (`example.com`
/// also matches its subdomains, `.corp` only subdomains), an IP address, a CIDR block
/// (`10.0.0.0/8`), or `*` (everything). Not a URL, a port or a pattern such as `*.corp`.
pub fn is_no_proxy_entry(entry: &str) -> bool {
    if entry == "*" {
        return true;
    }
    if let Some((ip, bits)) = entry.split_once('/') {
        let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
            return false;
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        return bits.parse::<u8>().is_ok_and(|b| b <= max);
    }
    if entry.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let host = entry.strip_prefix('.').unwrap_or(entry);
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_are_checked_without_echoing_them() {
        assert!(Egress::proxy("http://proxy:3128", &[]).is_ok());
        assert!(Egress::proxy("https://u:p@proxy.example.com:443/", &[]).is_ok());
        for (url, want) in [
            ("proxy:3128", EgressError::Scheme),
            ("not a url", EgressError::NotUrl),
            ("socks5://proxy:1080", EgressError::Scheme),
            ("ftp://proxy", EgressError::Scheme),
            ("http://proxy:3128/path", EgressError::Path),
            ("http://proxy:3128?x=1", EgressError::Path),
        ] {
            assert_eq!(Egress::proxy(url, &[]).unwrap_err(), want, "{url}");
        }
        let e = Egress::proxy("http://user:hunter2@proxy:3128", &[]).unwrap();
        assert!(!format!("{e:?}").contains("hunter2"));
    }

    #[test]
    fn no_proxy_entries_are_what_reqwest_matches_on() {
        for ok in [
            "internal.example.com",
            ".corp",
            "10.0.0.0/8",
            "192.168.1.1",
            "::1",
            "*",
            "fd00::/8",
        ] {
            assert!(is_no_proxy_entry(ok), "{ok}");
        }
        for bad in [
            "",
            "*.corp",
            "http://x",
            "a b",
            "10.0.0.0/33",
            "host:8080",
            "a,b",
            ".",
        ] {
            assert!(!is_no_proxy_entry(bad), "{bad}");
        }
    }

    #[test]
    fn every_egress_builds_a_client() {
        let no_proxy = vec!["internal.example.com".to_owned(), "10.0.0.0/8".to_owned()];
        for e in [
            Egress::Direct,
            Egress::proxy("http://u:p@proxy:3128", &no_proxy).unwrap(),
        ] {
            e.apply(reqwest::Client::builder())
                .unwrap()
                .build()
                .unwrap();
        }
    }
}
