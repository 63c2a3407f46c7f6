//! Outside tools the tests drive (the Segment and RudderStack SDKs, schemathesis,
//! Playwright), installed on first use into the cache folder.

use crate::*;

/// A Python with the unmodified `segment-analytics-python` SDK from PyPI, in a virtual
/// environment cached outside the clone.
pub fn python_with_segment_sdk() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        python_with(
            "venv-segment-sdk",
            "segment.analytics",
            "segment-analytics-python==2.4.0",
        )
    })
    .clone()
}

/// The `schemathesis` command from PyPI (property-based API testing against
/// `docs/openapi.yaml`), in a virtual environment cached outside the clone.
pub fn schemathesis() -> PathBuf {
    static ST: OnceLock<PathBuf> = OnceLock::new();
    ST.get_or_init(|| {
        python_with("venv-schemathesis", "schemathesis", "schemathesis==4.32.5")
            .with_file_name("schemathesis")
    })
    .clone()
}

/// A Python in the cached virtual environment `name` where `module` imports, installing
/// `package` from PyPI when it does not.
fn python_with(name: &str, module: &str, package: &str) -> PathBuf {
    let venv = cache_dir().join(name);
    let py = venv.join("bin/python");
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", &format!("import {module}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&py) {
        let status = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(status.success(), "creating the venv failed");
        let status = Command::new(&py)
            .args(["-m", "pip", "install", "-q", package])
            .status()
            .expect("pip install");
        assert!(status.success(), "pip install {package} failed");
    }
    py
}

/// A folder whose `node_modules` holds the unmodified `@rudderstack/rudder-sdk-node`
/// from npm, cached outside the clone. Run scripts with `NODE_PATH=<it>/node_modules`.
pub fn node_with_rudderstack_sdk() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        npm_folder(
            "node-rudderstack-sdk",
            "@rudderstack/rudder-sdk-node@3.0.13",
            "@rudderstack/rudder-sdk-node",
        )
    })
    .clone()
}

/// A folder whose `node_modules` holds `playwright-core` (it drives the system's
/// Chromium; it downloads no browser), cached outside the clone.
pub fn node_with_playwright() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        npm_folder(
            "node-playwright",
            "playwright-core@1.65.1",
            "playwright-core",
        )
    })
    .clone()
}

/// `npm install <spec>` into `$TESSERA_CACHE/<name>`, unless `package` is there already.
fn npm_folder(name: &str, spec: &str, package: &str) -> PathBuf {
    let dir = cache_dir().join(name);
    let marker = dir.join("node_modules").join(package).join("package.json");
    if !marker.exists() {
        std::fs::create_dir_all(&dir).expect("cache dir");
        let status = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(spec)
            .status()
            .expect("npm runs");
        assert!(
            status.success() && marker.exists(),
            "npm install {spec} failed"
        );
    }
    dir
}
