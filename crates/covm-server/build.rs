//! The web UI's assets, embedded in the binary (`src/ui.rs`): `web/dist`, built here with `npm ci`
//! and `npm run build` when it is missing or older than the UI's sources and npm is on the machine.
//! Without npm (or when the build fails, or with `COVM_UI_BUILD=0`) a page that says how to build the
//! UI is embedded instead, so that covm still compiles and serves its API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path).ok()?.flatten().filter_map(|e| newest(&e.path())).max()
}

fn npm(web: &Path, args: &[&str]) -> bool {
    println!("cargo:warning=building the web UI: npm {}", args.join(" "));
    match Command::new("npm").args(args).current_dir(web).status() {
        Ok(s) if s.success() => true,
        Ok(s) => {
            println!("cargo:warning=npm {} failed ({s})", args.join(" "));
            false
        }
        Err(e) => {
            println!("cargo:warning=npm {} could not run: {e}", args.join(" "));
            false
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let web = manifest.join("../../web");
    let dist = web.join("dist");
    let sources =
        ["src", "index.html", "package.json", "package-lock.json", "vite.config.ts", "tsconfig.json", "public"];
    // Only paths that exist: cargo counts a missing one as changed at every build (which would build
    // covm-server again each time). The built page too, so that a removed `web/dist` is built again
    // (or the fallback embedded) instead of leaving rust-embed a folder that is gone.
    for p in sources.iter().map(|s| web.join(s)).chain([dist.join("index.html")]).filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    if !web.exists() {
        println!("cargo:rerun-if-changed={}", manifest.join("build.rs").display());
    }
    println!("cargo:rerun-if-env-changed=COVM_UI_BUILD");
    let wanted = std::env::var("COVM_UI_BUILD").map_or(true, |v| v != "0");
    let built = newest(&dist.join("index.html"));
    let source_time = sources.iter().filter_map(|s| newest(&web.join(s))).max();
    let stale = match (built, source_time) {
        (None, _) => true,
        (Some(b), Some(s)) => s > b,
        (Some(_), None) => false,
    };
    if wanted && stale && web.join("package.json").exists() && Command::new("npm").arg("--version").output().is_ok() {
        let deps_stale = newest(&web.join("node_modules/.package-lock.json")) < newest(&web.join("package-lock.json"));
        if !deps_stale || npm(&web, &["ci", "--no-audit", "--no-fund"]) {
            npm(&web, &["run", "build"]);
        }
    }
    let dir = match dist.join("index.html").exists() {
        true => dist,
        false => {
            let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("ui-missing");
            std::fs::create_dir_all(&out).expect("OUT_DIR is writable");
            std::fs::write(out.join("index.html"), MISSING).expect("OUT_DIR is writable");
            out
        }
    };
    println!("cargo:rustc-env=COVM_UI_DIR={}", dir.canonicalize().unwrap_or(dir).display());
}

const MISSING: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>covm</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>covm</h1>
<p>This covm was built without its web UI: Node.js and npm were not there when it was compiled.</p>
<p>Install them (on Debian: <code>apt-get install nodejs npm</code>), then build covm again
(<code>cargo build --release --bin covm</code>): the build runs <code>npm ci</code> and
<code>npm run build</code> in <code>web/</code> and embeds the UI.</p>
<p>The API is at <a href="/api/v1/openapi.json">/api/v1/openapi.json</a>; the command-line client is <code>covm</code>.</p>
</body></html>
"#;
