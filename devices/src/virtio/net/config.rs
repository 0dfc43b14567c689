//! `--net tap=IFNAME[,mac=MAC][,id=NAME]`: parsing and checking one network device's options.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::tap::check_name;

/// Why a `--net` value is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("--net '{0}': unknown option (use tap=IFNAME[,mac=MAC][,id=NAME])")]
    UnknownOption(String),
    #[error("--net '{0}' needs tap=IFNAME")]
    NoTap(String),
    #[error("--net: '{0}' is not a MAC address (use six hex bytes, e.g. 52:54:00:12:34:56)")]
    BadMac(String),
    #[error("--net: MAC {0} is a multicast address")]
    MulticastMac(String),
    #[error("--net: '{0}' is not a valid interface name")]
    BadTap(String),
    #[error("--net: id '{0}' is not valid (1-32 characters of A-Z a-z 0-9 _ -)")]
    BadId(String),
}

/// One network device as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The host tap interface.
    pub tap: String,
    /// The guest's MAC address; `None` derives a stable one from the id.
    pub mac: Option<[u8; 6]>,
    /// The stable device id (`net0`, `net1`... by position when not given).
    pub id: Option<String>,
}

impl NetConfig {
    /// The device id of the `index`th `--net`.
    pub fn device_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("net{index}"))
    }

    /// The MAC address: the configured one, or a locally administered one derived from `id`.
    pub fn mac_for(&self, id: &str) -> [u8; 6] {
        self.mac.unwrap_or_else(|| {
            // FNV-1a of the id: stable across runs and restores.
            let mut h: u32 = 0x811c_9dc5;
            for b in id.bytes() {
                h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
            }
            let b = h.to_be_bytes();
            [0x52, 0x54, b[0], b[1], b[2], b[3]]
        })
    }
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(text: &str) -> Result<[u8; 6], NetConfigError> {
    let bad = || NetConfigError::BadMac(text.chars().take(40).collect());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(NetConfigError::MulticastMac(text.into()));
    }
    Ok(mac)
}

/// Checks a device id.
pub fn check_id(id: &str) -> Result<(), NetConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NetConfigError::BadId(id.chars().take(40).collect()))
    }
}

/// The options of one `--net` value, before `tap=` is required: `restore` and `dr recover`
/// accept `id=NAME,tap=IFNAME` alone.
pub fn parse_options(text: &str) -> Result<NetConfig, NetConfigError> {
    let mut cfg = NetConfig {
        tap: String::new(),
        mac: None,
        id: None,
    };
    for opt in text.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some(("tap", v)) => {
                check_name(v).map_err(|_| NetConfigError::BadTap(v.chars().take(40).collect()))?;
                cfg.tap = v.into();
            }
            Some(("mac", v)) => cfg.mac = Some(parse_mac(v)?),
            Some(("id", v)) => {
                check_id(v)?;
                cfg.id = Some(v.into());
            }
            _ => {
                return Err(NetConfigError::UnknownOption(
                    opt.chars().take(60).collect(),
                ))
            }
        }
    }
    Ok(cfg)
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let cfg = parse_options(text)?;
        if cfg.tap.is_empty() {
            return Err(NetConfigError::NoTap(text.chars().take(60).collect()));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let c: NetConfig = "tap=tap0,mac=52:54:00:12:34:56,id=web".parse().unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(c.device_id(3), "web");
        let d: NetConfig = "tap=t1".parse().unwrap();
        assert_eq!(d.device_id(1), "net1");
        assert_eq!(d.mac_for("net1"), d.mac_for("net1"));
        assert_ne!(d.mac_for("net1"), d.mac_for("net2"));
        assert_eq!(d.mac_for("net1")[0] & 3, 2, "locally administered unicast");
        assert!(matches!(
            "mac=52:54:00:12:34:56".parse::<NetConfig>(),
            Err(NetConfigError::NoTap(_))
        ));
        assert!(matches!(
            "tap=a,mac=01:00:00:00:00:00".parse::<NetConfig>(),
            Err(NetConfigError::MulticastMac(_))
        ));
        assert!(matches!(
            "tap=a,mac=zz".parse::<NetConfig>(),
            Err(NetConfigError::BadMac(_))
        ));
        assert!(matches!(
            "tap=a/b".parse::<NetConfig>(),
            Err(NetConfigError::BadTap(_))
        ));
        assert!(matches!(
            "tap=a,id=x y".parse::<NetConfig>(),
            Err(NetConfigError::BadId(_))
        ));
        assert!(matches!(
            "tap=a,foo=1".parse::<NetConfig>(),
            Err(NetConfigError::UnknownOption(_))
        ));
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 1, 2, 0xab]),
            "52:54:00:01:02:ab"
        );
    }
}
