//! The Taper operator. The controllers arrive with the operator issue; for now the binary
//! reports its version and the resources it will manage.

use clap::Parser;

/// Kubernetes operator for Taper's Dataset, PretrainJob and FinetuneJob resources.
#[derive(Debug, Parser)]
#[command(name = "taper-operator", version)]
struct Args {}

fn main() {
    let _args = Args::parse();
    for crd in taper_crds::crds() {
        println!("manages {}", crd.metadata.name.unwrap_or_default());
    }
}
