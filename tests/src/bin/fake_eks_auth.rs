//! The sandbox's fake EKS Auth as a standalone server, for the kind recipe
//! (`deploy/kind/`): `fake-eks-auth --listen 0.0.0.0:8080 --cluster kind --associate ns/sa=Role ...`.
//! Token signatures are not checked unless `--issuer-public-key-der FILE` is given: a test
//! double, never a service.

use anyhow::{bail, Context, Result};
use tests::fake_eks::FakeEksAuth;

fn main() -> Result<()> {
    let mut listen = "0.0.0.0:8080".to_owned();
    let mut cluster = "kind".to_owned();
    let mut key = None;
    let mut associations = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value()?,
            "--cluster" => cluster = value()?,
            "--issuer-public-key-der" => {
                let der = std::fs::read(value()?)?;
                key = Some(jsonwebtoken::DecodingKey::from_rsa_der(&der));
            }
            "--associate" => {
                let v = value()?;
                let (sa, role) = v.split_once('=').context("--associate ns/sa=Role")?;
                let (ns, sa) = sa.split_once('/').context("--associate ns/sa=Role")?;
                associations.push((ns.to_owned(), sa.to_owned(), role.to_owned()));
            }
            _ => bail!("unknown flag {flag}; see the source header for usage"),
        }
    }
    let listener =
        std::net::TcpListener::bind(&listen).with_context(|| format!("binding {listen}"))?;
    let fake = FakeEksAuth::serve(listener, &cluster, key)?;
    for (ns, sa, role) in &associations {
        fake.associate(ns, sa, role);
    }
    println!("fake EKS Auth for cluster {cluster} on {}", fake.addr());
    fake.wait_forever()
}
