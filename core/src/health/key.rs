//! A socket address as 32 plain bytes (family, port, IP, IPv6 flow info and scope), the
//! key of a server's record in shared memory: unlike `SocketAddr` it has no padding, so
//! a copied record holds no undefined bytes.

use std::net::{SocketAddr, SocketAddrV6};

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrKey([u8; 32]);

impl AddrKey {
    pub fn of(a: &SocketAddr) -> AddrKey {
        let mut k = [0u8; 32];
        k[1..3].copy_from_slice(&a.port().to_be_bytes());
        match a {
            SocketAddr::V4(v4) => {
                k[0] = 4;
                k[3..7].copy_from_slice(&v4.ip().octets());
            }
            SocketAddr::V6(v6) => {
                k[0] = 6;
                k[3..19].copy_from_slice(&v6.ip().octets());
                k[19..23].copy_from_slice(&v6.flowinfo().to_be_bytes());
                k[23..27].copy_from_slice(&v6.scope_id().to_be_bytes());
            }
        }
        AddrKey(k)
    }

    pub fn addr(&self) -> SocketAddr {
        let k = &self.0;
        let port = u16::from_be_bytes([k[1], k[2]]);
        if k[0] == 4 {
            return SocketAddr::from(([k[3], k[4], k[5], k[6]], port));
        }
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&k[3..19]);
        let u32_at = |i: usize| u32::from_be_bytes([k[i], k[i + 1], k[i + 2], k[i + 3]]);
        SocketAddr::V6(SocketAddrV6::new(ip.into(), port, u32_at(19), u32_at(23)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for a in [
            "127.0.0.1:8080",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:53",
            "[fe80::1%7]:9000",
            "[2001:db8::ff00:42:8329]:443",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(AddrKey::of(&addr).addr(), addr, "{a}");
        }
        let v6 = SocketAddr::V6(SocketAddrV6::new("::2".parse().unwrap(), 80, 0x12345, 3));
        assert_eq!(AddrKey::of(&v6).addr(), v6);
        assert_ne!(
            AddrKey::of(&"127.0.0.1:1".parse().unwrap()),
            AddrKey::of(&"[::ffff:127.0.0.1]:1".parse().unwrap())
        );
    }
}
