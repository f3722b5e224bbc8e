//! The one validator for what an operator types, whichever way it comes in: the config file,
//! the CLI's arguments and the control socket's JSON all go through these types and
//! functions, so the same text is accepted or refused with the same message everywhere.
//!
//! Each validated type parses from text (`FromStr`, for clap and the config file) and
//! deserializes through the same check (serde, for the socket and the state file).

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use ipnet::IpNet;
use limiter_common::rate::Gcra;
use serde::{Deserialize, Serialize};

/// Why an input was refused. The text is the whole message: it names the value and says
/// what would be accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

fn refuse(message: impl Into<String>) -> InputError {
    InputError(message.into())
}

// ---------------------------------------------------------------------------------------------
// Prefixes.

/// A CIDR prefix as an operator states it: `address/length` with no host bits set, or a bare
/// address meaning the full length. An IPv4-mapped IPv6 prefix (`::ffff:192.0.2.1`) is
/// normalised to its IPv4 prefix, because the data plane sees those sources as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(IpNet);

impl Prefix {
    /// The prefix.
    pub fn net(self) -> IpNet {
        self.0
    }

    /// Checks an already-parsed prefix with the same rules as text.
    pub fn new(net: IpNet) -> Result<Self, InputError> {
        net.to_string().parse()
    }

    /// Whether the prefix is wider than an operator is likely to mean for a deny: wider than
    /// an IPv4 /8 or an IPv6 /32 (0.0.0.0/0 included).
    pub fn is_wide(self) -> bool {
        match self.0 {
            IpNet::V4(n) => n.prefix_len() < WIDE_DENY_V4,
            IpNet::V6(n) => n.prefix_len() < WIDE_DENY_V6,
        }
    }
}

/// The shortest IPv4 deny accepted without `--force`.
pub const WIDE_DENY_V4: u8 = 8;
/// The shortest IPv6 deny accepted without `--force`.
pub const WIDE_DENY_V6: u8 = 32;

impl FromStr for Prefix {
    type Err = InputError;

    fn from_str(text: &str) -> Result<Self, InputError> {
        const EXAMPLE: &str = "such as 192.0.2.0/24, 2001:db8::/32 or a bare address";
        let (addr_text, len_text) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        // std's parser (not ipnet's): strict, and fast even in debug builds.
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            refuse(format!(
                "invalid prefix {text:?}: {addr_text:?} is not an IP address ({EXAMPLE})"
            ))
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_text {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|n| len.bytes().all(|b| b.is_ascii_digit()) && *n <= max)
                .ok_or_else(|| {
                    refuse(format!(
                        "invalid prefix {text:?}: the length must be 0-{max} ({EXAMPLE})"
                    ))
                })?,
        };
        let net = IpNet::new(addr, len).map_err(|e| refuse(format!("{text:?}: {e}")))?;
        if net.trunc() != net {
            return Err(refuse(format!(
                "prefix {text:?} has host bits set: did you mean {}?",
                net.trunc()
            )));
        }
        if let IpNet::V6(v6) = net
            && let Some(v4) = v6.addr().to_ipv4_mapped()
        {
            // ::ffff:0:0/96 holds the IPv4 space; a shorter prefix reaches past it.
            let Some(v4_len) = v6.prefix_len().checked_sub(96) else {
                return Err(refuse(format!(
                    "prefix {text:?} covers IPv4-mapped addresses and more: state the IPv4 \
                     part as an IPv4 prefix and the rest separately"
                )));
            };
            let net =
                IpNet::new(IpAddr::V4(v4), v4_len).map_err(|e| refuse(format!("{text:?}: {e}")))?;
            return Ok(Self(net));
        }
        Ok(Self(net))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Prefix> for IpNet {
    fn from(p: Prefix) -> Self {
        p.0
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How the CLI and the socket say "I mean it" for a wide deny.
pub const FORCE_HINT_CLI: &str = "repeat it with --force";

/// Refuses a deny wider than [`WIDE_DENY_V4`] / [`WIDE_DENY_V6`] unless forced: one typo
/// there drops a large part of the Internet, the exchange's own clients included. `hint`
/// says how to force it where the deny came from.
pub fn check_deny_width(prefix: Prefix, force: bool, hint: &str) -> Result<(), InputError> {
    if prefix.is_wide() && !force {
        return Err(refuse(format!(
            "a deny of {prefix} covers more than an IPv4 /{WIDE_DENY_V4} or an IPv6 \
             /{WIDE_DENY_V6}; if that is really meant, {hint}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Names.

/// The longest class or service name: it is a Prometheus label value and a table column.
pub const MAX_NAME_CHARS: usize = 64;

/// A class or service name: 1 to [`MAX_NAME_CHARS`] printable characters with no leading or
/// trailing white space, and not `default` (the default limit's name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks `text` as a name of `kind` ("class" or "service").
    pub fn parse(kind: &str, text: &str) -> Result<Self, InputError> {
        let shown: String = text.chars().take(MAX_NAME_CHARS).collect();
        if text.is_empty() {
            return Err(refuse(format!("{kind} name must not be empty")));
        }
        if text.chars().count() > MAX_NAME_CHARS {
            return Err(refuse(format!(
                "{kind} name {shown:?}... is longer than {MAX_NAME_CHARS} characters"
            )));
        }
        if text.chars().any(char::is_control) || text.trim() != text {
            return Err(refuse(format!(
                "{kind} name {text:?} must be printable, with no control characters and no \
                 leading or trailing white space"
            )));
        }
        if text == "default" {
            return Err(refuse(format!(
                "{kind} name \"default\" is reserved for the default limit"
            )));
        }
        Ok(Self(text.to_owned()))
    }
}

impl FromStr for Name {
    type Err = InputError;

    fn from_str(text: &str) -> Result<Self, InputError> {
        Self::parse("class or service", text)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.0
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// Rates.

/// Checks a rate and its burst: both must make a bucket (see [`Gcra::per_second`]). The
/// message says why; callers say where the rate was written.
pub fn check_rate(per_second: u64, burst: u64) -> Result<(), InputError> {
    Gcra::per_second(per_second, burst)
        .map(drop)
        .map_err(|e| refuse(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Durations.

/// The longest duration accepted for a temporary entry or the penalty box: a year. Longer
/// is a permanent entry, stated as such (no `--ttl`).
pub const MAX_DURATION_SECONDS: u64 = 365 * 86_400;

/// Checks a duration in seconds against [`MAX_DURATION_SECONDS`].
pub fn check_seconds(seconds: u64) -> Result<u64, InputError> {
    if seconds > MAX_DURATION_SECONDS {
        return Err(refuse(format!(
            "{seconds}s is longer than the maximum, {}d ({MAX_DURATION_SECONDS}s); \
             for a permanent list entry give no --ttl",
            MAX_DURATION_SECONDS / 86_400
        )));
    }
    Ok(seconds)
}

/// Parses a duration: a whole number followed by one unit, `s`, `m`, `h` or `d` (`"90s"`,
/// `"10m"`, `"2h"`, `"1d"`), at most [`MAX_DURATION_SECONDS`]. Zero (`"0s"`) is accepted;
/// callers that need a positive duration check for it.
pub fn parse_duration(text: &str) -> Result<Duration, InputError> {
    const EXPECTED: &str = "expected a whole number and a unit (s, m, h or d), such as 90s or 10m";
    if text.is_empty() {
        return Err(refuse(format!("empty duration: {EXPECTED}")));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(refuse(format!("invalid duration {text:?}: {EXPECTED}")));
    }
    let seconds_per_unit: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "" => return Err(refuse(format!("duration {text:?} has no unit: {EXPECTED}"))),
        _ => {
            return Err(refuse(format!(
                "duration {text:?} has an unknown unit: {EXPECTED}"
            )));
        }
    };
    let seconds = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(seconds_per_unit))
        .unwrap_or(u64::MAX);
    check_seconds(seconds)
        .map(Duration::from_secs)
        .map_err(|e| refuse(format!("duration {text:?}: {e}")))
}

/// The longest penalty box a limit may state: a ban longer than a day belongs in the
/// denylist, where it is visible and audited.
pub const MAX_BLOCK_SECONDS: u64 = 86_400;

/// Checks a limit's penalty-box duration.
pub fn check_block_seconds(seconds: u64) -> Result<u64, InputError> {
    if seconds > MAX_BLOCK_SECONDS {
        return Err(InputError(format!(
            "block_seconds = {seconds} is more than a day ({MAX_BLOCK_SECONDS}); a longer ban \
             belongs in the denylist"
        )));
    }
    Ok(seconds)
}

/// A duration in whole seconds, as the socket carries it: at most [`MAX_DURATION_SECONDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(u64);

impl Seconds {
    /// Checks a number of seconds.
    pub fn new(seconds: u64) -> Result<Self, InputError> {
        check_seconds(seconds).map(Self)
    }

    /// The seconds.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for Seconds {
    type Err = InputError;

    fn from_str(text: &str) -> Result<Self, InputError> {
        parse_duration(text).map(|d| Self(d.as_secs()))
    }
}

impl Serialize for Seconds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(u64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(text: &str) -> Result<String, String> {
        text.parse::<Prefix>()
            .map(|p| p.to_string())
            .map_err(|e| e.0)
    }

    #[test]
    fn prefixes_are_strict_and_normalised() {
        assert_eq!(prefix("192.0.2.0/24").unwrap(), "192.0.2.0/24");
        assert_eq!(prefix("192.0.2.7").unwrap(), "192.0.2.7/32");
        assert_eq!(prefix("2001:db8::1").unwrap(), "2001:db8::1/128");
        assert!(
            prefix("10.9.9.9/8")
                .unwrap_err()
                .contains("did you mean 10.0.0.0/8?")
        );
        assert!(
            prefix("10.200.3.4/16")
                .unwrap_err()
                .contains("did you mean 10.200.0.0/16?")
        );
        assert_eq!(prefix("::ffff:10.1.2.3").unwrap(), "10.1.2.3/32");
        assert_eq!(prefix("::ffff:10.1.2.0/120").unwrap(), "10.1.2.0/24");
        assert!(
            prefix("::ffff:0:0/95").is_err(),
            "reaches past the mapped space"
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "1.2.3",
            "x",
            "10.0.0.0/8/8",
        ] {
            assert!(prefix(bad).is_err(), "{bad:?}");
        }
        let json: Result<Prefix, _> = serde_json::from_str("\"10.9.9.9/8\"");
        assert!(json.unwrap_err().to_string().contains("host bits"));
    }

    #[test]
    fn wide_denies_need_force() {
        for (text, wide) in [
            ("0.0.0.0/0", true),
            ("10.0.0.0/7", true),
            ("10.0.0.0/8", false),
            ("::/0", true),
            ("2001:db8::/31", true),
            ("2001:db8::/32", false),
        ] {
            let p: Prefix = text.parse().unwrap();
            assert_eq!(
                check_deny_width(p, false, FORCE_HINT_CLI).is_err(),
                wide,
                "{text}"
            );
            assert!(check_deny_width(p, true, FORCE_HINT_CLI).is_ok());
        }
    }

    #[test]
    fn names() {
        assert!(Name::parse("class", "market-makers").is_ok());
        for bad in ["", "default", " x", "x ", "a\nb", "tab\there"] {
            assert!(Name::parse("class", bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(60_000);
        let e = Name::parse("class", &long).unwrap_err().0;
        assert!(e.len() < 200, "the message does not echo 60,000 characters");
        assert!(Name::parse("class", &"x".repeat(MAX_NAME_CHARS)).is_ok());
        assert!(serde_json::from_str::<Name>("\"\"").is_err());
    }

    #[test]
    fn durations_have_a_maximum() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(
            parse_duration("365d").unwrap().as_secs(),
            MAX_DURATION_SECONDS
        );
        let e = parse_duration("18446744073709551615s").unwrap_err().0;
        assert!(e.contains("maximum, 365d"), "{e}");
        assert!(parse_duration("366d").is_err());
        assert!(parse_duration("99999999999999999999999d").is_err());
        assert_eq!(parse_duration("10m").unwrap().as_secs(), 600);
        assert_eq!(parse_duration("1h").unwrap().as_secs(), 3600);
        assert_eq!(parse_duration("2d").unwrap().as_secs(), 2 * 86_400);
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in [
            "", "10", "5x", "-1m", "+1m", "m", "1.5h", " 1m", "1m ", "1h30m",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_duration("10").unwrap_err().0.contains("no unit"));
        assert!(serde_json::from_str::<Seconds>("18446744073709551615").is_err());
        assert_eq!(serde_json::from_str::<Seconds>("60").unwrap().get(), 60);
    }

    #[test]
    fn rates() {
        assert!(check_rate(1000, 2000).is_ok());
        assert!(check_rate(0, 5).is_err());
    }
}
