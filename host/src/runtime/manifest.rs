//! Plugin manifests: the optional `NAME.toml` beside `NAME.wasm`.
//!
//! A manifest says what the plugin's tasks need from the host. Today that is the GPU
//! requirement:
//!
//! ```toml
//! [gpu]
//! min_gpu_memory_gb = 6.5     # free memory, in GiB (2^30 bytes); fractions allowed
//! max_gpu_utilization = 70    # start only while the GPU is at most this busy, in percent
//! ```
//!
//! Unknown sections and keys are refused, so a misspelt key is an error at load time rather
//! than a requirement silently ignored. Every error names the file and the key.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use serde::Deserialize;

use crate::gpu::GpuRequirement;

/// A plugin's manifest, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifest {
    /// What the plugin's tasks need of a GPU; `None` when they need none.
    pub gpu: Option<GpuRequirement>,
    /// Things that load but should change (deprecated keys), to be logged.
    pub warnings: Vec<String>,
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    gpu: Option<GpuSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuSection {
    min_gpu_memory_gb: Option<f64>,
    max_gpu_utilization: Option<f64>,
    /// The replaced framework's name for `max_gpu_utilization`: despite "min", it meant
    /// "run only while utilization is at most this".
    min_gpu_utilization: Option<f64>,
}

/// The manifest path for the plugin at `wasm`: the same name with `.toml`.
pub fn manifest_path(wasm: &Path) -> PathBuf {
    wasm.with_extension("toml")
}

impl Manifest {
    /// Reads the manifest beside the plugin at `wasm`; the default when there is none.
    pub fn for_plugin(wasm: &Path) -> anyhow::Result<Manifest> {
        let path = manifest_path(wasm);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Manifest::default());
            }
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("cannot read manifest {}", path.display()));
            }
        };
        Manifest::parse(&text).with_context(|| format!("manifest {}", path.display()))
    }

    /// Parses and checks a manifest's text.
    pub fn parse(text: &str) -> anyhow::Result<Manifest> {
        let file: ManifestFile = toml::from_str(text).map_err(|err| anyhow!("{err}"))?;
        let mut manifest = Manifest::default();
        if let Some(gpu) = file.gpu {
            let utilization = match (gpu.max_gpu_utilization, gpu.min_gpu_utilization) {
                (Some(_), Some(_)) => {
                    return Err(anyhow!(
                        "[gpu] sets both max_gpu_utilization and its deprecated alias \
                         min_gpu_utilization; keep max_gpu_utilization"
                    ));
                }
                (None, Some(old)) => {
                    manifest.warnings.push(
                        "[gpu] min_gpu_utilization is deprecated: it means \"start only while \
                         utilization is at most this\"; name it max_gpu_utilization"
                            .to_owned(),
                    );
                    Some(old)
                }
                (max, None) => max,
            };
            let requirement = GpuRequirement::from_settings(gpu.min_gpu_memory_gb, utilization)
                .map_err(|err| anyhow!("[gpu] {err}"))?;
            manifest.gpu = Some(requirement);
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GIB;

    #[test]
    fn gpu_requirement_reads_in_gib_and_percent() {
        let manifest =
            Manifest::parse("[gpu]\nmin_gpu_memory_gb = 6.5\nmax_gpu_utilization = 70\n").unwrap();
        let gpu = manifest.gpu.unwrap();
        assert_eq!(gpu.memory_bytes, Some(6 * GIB + GIB / 2));
        assert_eq!(gpu.max_utilization, Some(70));
        assert!(manifest.warnings.is_empty());
    }

    #[test]
    fn an_empty_manifest_asks_for_nothing() {
        assert_eq!(Manifest::parse("").unwrap(), Manifest::default());
        // An empty [gpu] section still asks for a GPU, of any kind.
        assert_eq!(
            Manifest::parse("[gpu]\n").unwrap().gpu,
            Some(GpuRequirement::default())
        );
    }

    #[test]
    fn the_old_name_is_accepted_with_a_warning() {
        let manifest = Manifest::parse("[gpu]\nmin_gpu_utilization = 40\n").unwrap();
        assert_eq!(manifest.gpu.unwrap().max_utilization, Some(40));
        assert!(
            manifest.warnings[0].contains("deprecated"),
            "{:?}",
            manifest.warnings
        );

        let err = Manifest::parse("[gpu]\nmin_gpu_utilization = 40\nmax_gpu_utilization = 40\n")
            .unwrap_err();
        assert!(err.to_string().contains("both"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[gpu]\nmin_gpu_memory = 4\n", "min_gpu_memory"),
            ("[gpus]\n", "gpus"),
            ("[gpu]\nmin_gpu_memory_gb = -2\n", "min_gpu_memory_gb"),
            ("[gpu]\nmax_gpu_utilization = 250\n", "max_gpu_utilization"),
            ("[gpu]\nmin_gpu_memory_gb = \"four\"\n", "min_gpu_memory_gb"),
        ];
        for (text, key) in cases {
            let err = format!("{:#}", Manifest::parse(text).unwrap_err());
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_manifest_file_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("model.wasm");
        assert_eq!(Manifest::for_plugin(&wasm).unwrap(), Manifest::default());
        std::fs::write(manifest_path(&wasm), "[gpu]\nmax_gpu_utilization = 101\n").unwrap();
        let err = format!("{:#}", Manifest::for_plugin(&wasm).unwrap_err());
        assert!(err.contains("model.toml"), "{err}");
    }
}
