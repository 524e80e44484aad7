//! The service catalogue and how each service is located and addressed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A service the supervisor knows how to run.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    /// Middle part of `COMMERCE__<KEY>__PORT`, the services' own config key.
    config_key: &'static str,
    default_port: u16,
}

/// Every service, in start order (the gateway first so it is up soonest).
pub const CATALOGUE: [Spec; 8] = [
    spec("gateway", "GATEWAY", 8080),
    spec("user-svc", "USER", 8081),
    spec("product-svc", "PRODUCT", 8082),
    spec("order-svc", "ORDER", 8083),
    spec("payment-svc", "PAYMENT", 8084),
    spec("inventory-svc", "INVENTORY", 8085),
    spec("notification-svc", "NOTIFICATION", 8086),
    spec("file-svc", "FILE", 8087),
];

/// Names accepted by `--only`, in catalogue order.
pub const NAMES: [&str; 8] = {
    let mut names = [""; 8];
    let mut i = 0;
    while i < CATALOGUE.len() {
        names[i] = CATALOGUE[i].name;
        i += 1;
    }
    names
};

const fn spec(name: &'static str, config_key: &'static str, default_port: u16) -> Spec {
    Spec {
        name,
        config_key,
        default_port,
    }
}

/// A service resolved for this run: where its executable is and which port it serves.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: &'static str,
    /// Position in the catalogue; picks the prefix colour.
    pub index: usize,
    pub port: u16,
    pub exe: PathBuf,
    /// Its share of the machine's cores, for its async runtime.
    pub worker_threads: usize,
}

/// Selects the services to run (all when `only` is empty) and checks their executables exist.
pub fn resolve(only: &[String], bin_dir: &Path) -> Result<Vec<Service>> {
    let chosen: Vec<(usize, &Spec)> = CATALOGUE
        .iter()
        .enumerate()
        .filter(|(_, spec)| only.is_empty() || only.iter().any(|name| name == spec.name))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let worker_threads = share_of_cores(cores, chosen.len());
    let services = chosen
        .into_iter()
        .map(|(index, spec)| {
            Ok(Service {
                name: spec.name,
                index,
                port: port(spec)?,
                exe: bin_dir.join(spec.name),
                worker_threads,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    check_executables(&services, bin_dir)?;
    Ok(services)
}

/// The directory holding the `commerce` executable, where cargo also puts the services.
pub fn default_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the commerce executable")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("the commerce executable has no parent directory")
}

/// Worker threads for each of `services` sharing `cores`: a runtime per service with a
/// thread per core would put several times as many threads as cores on the machine,
/// which then spend their time waking each other (docs/BENCHMARKS.md).
fn share_of_cores(cores: usize, services: usize) -> usize {
    (cores / services.max(1)).max(1)
}

/// The port the service will listen on: the same env override the service itself reads.
fn port(spec: &Spec) -> Result<u16> {
    let var = format!("COMMERCE__{}__PORT", spec.config_key);
    match std::env::var(&var) {
        Ok(value) => parse_port(&value).with_context(|| format!("invalid {var}={value:?}")),
        Err(std::env::VarError::NotPresent) => Ok(spec.default_port),
        Err(err) => Err(err).with_context(|| format!("invalid {var}")),
    }
}

fn parse_port(value: &str) -> Result<u16> {
    match value.trim().parse::<u16>() {
        Ok(0) => bail!("port must not be 0"),
        Ok(port) => Ok(port),
        Err(err) => Err(err).context("not a port number"),
    }
}

/// Fails before anything starts, so a half-built tree never runs half the system.
fn check_executables(services: &[Service], bin_dir: &Path) -> Result<()> {
    let missing: Vec<&str> = services
        .iter()
        .filter(|svc| !is_executable(&svc.exe))
        .map(|svc| svc.name)
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing service executable(s) in {}: {}; build them first with \
             `cargo build --bins` (or point --bin-dir at them)",
            bin_dir.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_catalogue_order() {
        assert_eq!(NAMES[0], "gateway");
        assert_eq!(NAMES[7], "file-svc");
    }

    #[test]
    fn parses_ports() {
        assert_eq!(parse_port("8080").ok(), Some(8080));
        assert_eq!(parse_port(" 9000 ").ok(), Some(9000));
        assert!(parse_port("0").is_err());
        assert!(parse_port("http").is_err());
        assert!(parse_port("70000").is_err());
    }

    #[test]
    fn services_share_the_cores_with_at_least_one_thread_each() {
        assert_eq!(share_of_cores(2, 8), 1);
        assert_eq!(share_of_cores(16, 8), 2);
        assert_eq!(share_of_cores(16, 1), 16);
        assert_eq!(share_of_cores(1, 0), 1);
    }

    #[test]
    fn missing_executables_mention_cargo_build() {
        let dir = Path::new("/nonexistent-commerce-bin-dir");
        let err = resolve(&["order-svc".to_owned()], dir)
            .err()
            .map(|err| err.to_string())
            .unwrap_or_default();
        assert!(err.contains("order-svc"), "{err}");
        assert!(err.contains("cargo build --bins"), "{err}");
    }
}
