//! Property tests of the parsers that see untrusted input: tokens, Host headers, cgroup paths.

use std::path::Path;

use base64::Engine as _;
use proptest::prelude::*;

use crate::cgroup::pod_uid_from_path;
use crate::server::handler::host_without_port;
use crate::token::{parse, TokenError};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn uid() -> impl Strategy<Value = String> {
    "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
}

proptest! {
    #[test]
    fn any_token_string_is_answered_without_panic(s in any::<String>()) {
        let _ = parse(&s, 1_000);
    }

    #[test]
    fn any_three_segment_token_is_answered_without_panic(a in "[A-Za-z0-9_-]{0,40}", b in any::<Vec<u8>>(), c in "[A-Za-z0-9_-]{0,40}") {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b);
        let _ = parse(&format!("{a}.{payload}.{c}"), 1_000);
    }

    #[test]
    fn the_time_window_is_enforced(exp in 0i64..3_000, nbf in 0i64..3_000, now in 0i64..3_000, pod in uid()) {
        let token = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256"}"#),
            b64(&format!(r#"{{"exp":{exp},"nbf":{nbf},"kubernetes.io":{{"pod":{{"uid":"{pod}"}}}}}}"#)),
        );
        match parse(&token, now) {
            Ok(c) => {
                prop_assert!(exp > now && nbf <= now);
                prop_assert_eq!(c.pod_uid(), Some(pod.as_str()));
            }
            Err(TokenError::Expired) => prop_assert!(exp <= now),
            Err(TokenError::NotYetValid) => prop_assert!(exp > now && nbf > now),
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    #[test]
    fn host_parsing_strips_exactly_the_port(a in any::<[u8; 4]>(), v6 in any::<[u16; 8]>(), port in any::<u16>(), junk in any::<String>()) {
        let v4 = std::net::Ipv4Addr::from(a).to_string();
        let v6 = std::net::Ipv6Addr::from(v6).to_string();
        let (v4_port, v6_bare, v6_port) = (format!("{v4}:{port}"), format!("[{v6}]"), format!("[{v6}]:{port}"));
        prop_assert_eq!(host_without_port(&v4), v4.as_str());
        prop_assert_eq!(host_without_port(&v4_port), v4.as_str());
        prop_assert_eq!(host_without_port(&v6_bare), v6.as_str());
        prop_assert_eq!(host_without_port(&v6_port), v6.as_str());
        let _ = host_without_port(&junk);
    }

    #[test]
    fn pod_uids_come_out_of_every_kubelet_path_shape(
        id in uid(),
        qos in prop::sample::select(vec!["", "besteffort", "burstable"]),
        runtime in prop::sample::select(vec!["cri-containerd", "crio", "docker"]),
        ctr in "[0-9a-f]{12,64}",
        nested in prop::collection::vec("[a-z0-9_.-]{1,12}", 0..3),
    ) {
        let under = nested.join("/");
        let systemd_pod = if qos.is_empty() {
            format!("kubepods.slice/kubepods-pod{}.slice", id.replace('-', "_"))
        } else {
            format!("kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice", id.replace('-', "_"))
        };
        let cgroupfs_pod = if qos.is_empty() { format!("kubepods/pod{id}") } else { format!("kubepods/{qos}/pod{id}") };
        for path in [
            format!("/sys/fs/cgroup/{systemd_pod}/{runtime}-{ctr}.scope/{under}"),
            format!("/sys/fs/cgroup/{cgroupfs_pod}/{ctr}/{under}"),
        ] {
            prop_assert_eq!(pod_uid_from_path(Path::new(&path)), Some(id.clone()), "{}", path);
        }
    }

    #[test]
    fn any_path_is_answered_without_panic(p in any::<String>()) {
        let _ = pod_uid_from_path(Path::new(&p));
    }
}
