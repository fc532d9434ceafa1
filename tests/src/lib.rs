//! The node sandbox: everything an end-to-end test of the agent needs on one machine, built
//! from real kernel parts (network namespaces, veth, cgroup v2) and torn down on drop.
//!
//! Network safety: every client runs inside a namespace made here; the fake EKS Auth listens
//! on the node namespace's loopback; the agent attaches only to the cgroup tree made here.
#![deny(missing_docs)]

pub mod agent;
pub mod budget;
pub mod callgrind;
pub mod cgroups;
pub mod chart;
pub mod clients;
pub mod daemonset;
pub mod fake_eks;
pub mod fixtures;
pub mod image;
pub mod issuer;
pub mod leaks;
pub mod names;
pub mod netns;
pub mod plots;
pub mod prometheus;
pub mod realnode;
pub mod registry;
pub mod sandbox;
pub mod slow;
pub mod spread;
pub mod teardown;
