//! Property tests of the parsers that see untrusted input: tokens, Host headers, cgroup paths.

use std::path::Path;

use base64::Engine as _;
use proptest::prelude::*;

use crate::cgroup::{at_pod_position, pod_uid_from_name};
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
                prop_assert_eq!(c.pod_uid.as_deref(), Some(pod.as_str()));
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
    fn only_the_pod_level_cgroup_names_the_pod_whatever_is_nested(
        id in uid(),
        other in uid(),
        qos in prop::sample::select(vec!["", "besteffort", "burstable"]),
        runtime in prop::sample::select(vec!["cri-containerd", "crio", "docker"]),
        ctr in "[0-9a-f]{12,64}",
        nested in prop::collection::vec("[a-z0-9_.-]{1,12}", 0..3),
    ) {
        let u = |id: &str| id.replace('-', "_");
        let (systemd_root, cgroupfs_root) = (Path::new("/sys/fs/cgroup/kubepods.slice"), Path::new("/sys/fs/cgroup/kubepods"));
        let systemd_pod = if qos.is_empty() {
            systemd_root.join(format!("kubepods-pod{}.slice", u(&id)))
        } else {
            systemd_root.join(format!("kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice", u(&id)))
        };
        let cgroupfs_pod = if qos.is_empty() { cgroupfs_root.join(format!("pod{id}")) } else { cgroupfs_root.join(format!("{qos}/pod{id}")) };
        let under = nested.join("/");
        for (root, pod, ctr) in [
            (systemd_root, &systemd_pod, format!("{runtime}-{ctr}.scope")),
            (cgroupfs_root, &cgroupfs_pod, ctr.clone()),
        ] {
            prop_assert!(at_pod_position(root, pod), "{}", pod.display());
            let name = pod.file_name().unwrap().to_str().unwrap();
            prop_assert_eq!(pod_uid_from_name(name), Some(id.clone()));
            // Whatever a container makes below itself, named after any pod, is not at a
            // pod's position.
            for evil in [format!("pod{other}"), format!("kubepods-pod{}.slice", u(&other))] {
                let deep = pod.join(&ctr).join(&under).join(&evil);
                prop_assert!(!at_pod_position(root, &deep), "{}", deep.display());
            }
        }
    }

    #[test]
    fn any_name_is_answered_without_panic(p in any::<String>()) {
        let _ = pod_uid_from_name(&p);
        let _ = at_pod_position(Path::new("/k"), Path::new(&p));
    }
}
