//! The Helm chart and the deployment files, validated offline by
//! `helm/imbridge/tests/validate.py`: Helm's own linter and template engine (PyPI
//! `helm-python-sdk`), the Kubernetes schemas (PyPI `kubernetes-validate`), and the properties
//! the chart promises, with every rendered configuration passed through this build's
//! `imbridge check-config`. `./test` installs the two Python packages.

use std::path::Path;
use std::process::Command;

#[test]
fn helm_chart_and_deploy_files_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("helm/imbridge/tests/validate.py");
    let output = Command::new("python3")
        .arg(&script)
        .current_dir(root)
        .env("IMBRIDGE_BIN", env!("CARGO_BIN_EXE_imbridge"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 {} ({e}); `./test` sets up what it needs",
                script.display()
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Missing packages fail the test rather than skip it: the chart is part of the product.
    assert!(
        output.status.success(),
        "chart validation failed ({}); `./test` installs the pinned helm-python-sdk and \
         kubernetes-validate it needs\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    println!("{stdout}");
}
