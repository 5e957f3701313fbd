//! `portcullis ca`: the interception CA.

use super::args::CaArgs;
use super::{usage_error, EXIT_USAGE};
use std::io::Write;
use std::process::ExitCode;

use crate::config::Config;
use crate::mitm::CertificateAuthority;

pub(super) fn load_ca(config: &Config, origin: &str) -> Result<CertificateAuthority, ExitCode> {
    let directory = config.ca_dir(origin).map_err(|e| usage_error(&e))?;
    CertificateAuthority::load_or_create(&directory).map_err(|error| {
        let _ = writeln!(std::io::stderr(), "{error}");
        ExitCode::from(EXIT_USAGE)
    })
}

pub(super) fn ca(args: CaArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(error) => return usage_error(&error),
    };
    let origin = match &args.config {
        Some(path) => path.display().to_string(),
        None => "defaults and environment".to_owned(),
    };
    let ca = match load_ca(&config, &origin) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let _ = write!(
        std::io::stdout(),
        "{}\n{}",
        ca.cert_path().display(),
        ca.cert_pem()
    );
    ExitCode::SUCCESS
}
