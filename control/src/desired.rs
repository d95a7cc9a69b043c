//! The operator's desired state as a file (`lbctl export`, `lbctl apply -f`): the
//! services with their backends and options, in YAML or JSON. Pure: parsing, the plan
//! that turns one service table into another (the [`Op`]s, in an order that validates),
//! and the table it produces, validated whole, so an apply is one change or none.
//!
//! ```yaml
//! services:
//!   - frontend: 10.96.0.10:80/tcp
//!     backends: [10.1.0.11:8080, 10.1.0.12:8080@2]
//!     options: {affinity: client-ip, mode: snat}
//! ```

use lb::service::{BackendSpec, ConfigError, Frontend, Op, ServiceOptions, ServiceTable};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// What the operator wants lbd to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
}

/// One service: `VIP:PORT/PROTO`, its backends (`IP:PORT[@WEIGHT]`) and options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    #[serde(with = "crate::proto::as_string")]
    pub frontend: Frontend,
    #[serde(default, with = "crate::proto::as_strings")]
    pub backends: Vec<BackendSpec>,
    #[serde(default, skip_serializing_if = "ServiceOptions::is_default")]
    pub options: ServiceOptions,
    /// Its backends' health check, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::health::HealthSpec>,
}

/// Health checks by service.
pub type HealthChecks = BTreeMap<Frontend, crate::health::HealthSpec>;

/// The file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl DesiredState {
    /// The state a service table is in (services by frontend, backends sorted), with
    /// the services' health checks.
    pub fn of(table: &ServiceTable, health: &HealthChecks) -> DesiredState {
        DesiredState {
            services: table
                .services()
                .map(|s| ServiceEntry {
                    frontend: s.frontend,
                    backends: s.backends.clone(),
                    options: s.options,
                    health: health.get(&s.frontend).cloned(),
                })
                .collect(),
        }
    }

    /// The health checks the file gives, each validated.
    pub fn health(&self) -> Result<HealthChecks, String> {
        let mut m = HealthChecks::new();
        for s in &self.services {
            if let Some(h) = &s.health {
                h.validate().map_err(|e| format!("{}: {e}", s.frontend))?;
                m.insert(s.frontend, h.clone());
            }
        }
        Ok(m)
    }

    /// Parse a file's text. Errors name the line and column (YAML and JSON alike) and
    /// what is wrong; unknown keys are errors.
    pub fn parse(text: &str, format: Format) -> Result<DesiredState, String> {
        match format {
            Format::Yaml => serde_yaml_ng::from_str(text).map_err(|e| e.to_string()),
            Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
        }
    }

    pub fn to_text(&self, format: Format) -> Result<String, String> {
        match format {
            Format::Yaml => serde_yaml_ng::to_string(self).map_err(|e| e.to_string()),
            Format::Json => serde_json::to_string_pretty(self)
                .map(|s| s + "\n")
                .map_err(|e| e.to_string()),
        }
    }
}

/// The format a file's name says: JSON when it ends in `.json`, else YAML.
pub fn format_of(path: &Path) -> Format {
    match path.extension().is_some_and(|e| e == "json") {
        true => Format::Json,
        false => Format::Yaml,
    }
}

/// Read the state file at `path`: `None` when there is none; an error naming the file
/// (and the line, for what does not parse) otherwise.
pub fn load(path: &Path) -> Result<Option<DesiredState>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => DesiredState::parse(&text, format_of(path))
            .map(Some)
            .map_err(|e| format!("state file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("state file {}: {e}", path.display())),
    }
}

/// A state written to a temporary file beside `path`, flushed to disk, not yet in
/// place: [`Pending::finish`] renames it over `path` (atomic) and flushes the directory;
/// dropping it removes the temporary file. So a crash leaves the old state or the new,
/// never a mix, and a change is written before it is made.
#[derive(Debug)]
pub struct Pending {
    tmp: PathBuf,
    path: PathBuf,
    done: bool,
}

/// Write `state` for `path` (creating its directory, mode 0700, if missing).
pub fn prepare(path: &Path, state: &DesiredState) -> std::io::Result<Pending> {
    use std::io::Write;
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.as_os_str().is_empty() && !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let text = state
        .to_text(format_of(path))
        .map_err(std::io::Error::other)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut f = std::fs::File::create(&tmp)?;
    let p = Pending {
        tmp,
        path: path.to_path_buf(),
        done: false,
    };
    if format_of(path) == Format::Yaml {
        f.write_all(b"# lbd's state, written by lbd at each change; `lbctl apply -f` takes it.\n")?;
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(p)
}

impl Pending {
    /// Put the state in place: rename over the file, then flush the directory.
    pub fn finish(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.done = true;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The operations that turn `current` into `desired`, in an order each validates in:
/// services removed, options changed, then per service backends removed, weights
/// changed, backends added, and new services last. Unchanged services get none (they
/// keep their id, their Maglev table and their flows).
pub fn plan(current: &ServiceTable, desired: &DesiredState) -> Result<Vec<Op>, PlanError> {
    let mut want: BTreeMap<Frontend, &ServiceEntry> = BTreeMap::new();
    for s in &desired.services {
        if want.insert(s.frontend, s).is_some() {
            return Err(PlanError::DuplicateService(s.frontend));
        }
    }
    let mut ops = Vec::new();
    for s in current.services() {
        if !want.contains_key(&s.frontend) {
            ops.push(Op::RemoveService {
                frontend: s.frontend,
            });
        }
    }
    let mut added = Vec::new();
    for (f, w) in &want {
        let Some(cur) = current.get(f) else {
            added.push(Op::AddService {
                frontend: *f,
                backends: w.backends.clone(),
                options: w.options,
            });
            continue;
        };
        let frontend = *f;
        let mut backend_ops = Vec::new();
        for b in &cur.backends {
            if !w.backends.iter().any(|x| x.same_endpoint(b.addr, b.port)) {
                backend_ops.push(Op::RemoveBackend {
                    frontend,
                    addr: b.addr,
                    port: b.port,
                });
            }
        }
        for b in &w.backends {
            match cur.find(b.addr.octets(), b.port) {
                Some(c) if c.weight != b.weight => backend_ops.push(Op::SetWeight {
                    frontend,
                    addr: b.addr,
                    port: b.port,
                    weight: b.weight,
                }),
                Some(_) => {}
                None => backend_ops.push(Op::AddBackend {
                    frontend,
                    backend: *b,
                }),
            }
        }
        let options = (cur.options != w.options).then_some(Op::SetOptions {
            frontend,
            options: w.options,
        });
        // A service whose options and backends both change is replaced: whichever goes
        // first, the intermediate service may be one the table refuses (DSR needs its
        // backends on the frontend's port).
        match (options, backend_ops.is_empty()) {
            (Some(_), false) => {
                ops.push(Op::RemoveService { frontend });
                added.push(Op::AddService {
                    frontend,
                    backends: w.backends.clone(),
                    options: w.options,
                });
            }
            (Some(o), true) => ops.push(o),
            (None, _) => ops.extend(backend_ops),
        }
    }
    ops.extend(added);
    Ok(ops)
}

/// The table `ops` produce from `current`, each validated as `lbctl` would validate it
/// alone: an error names the first that fails, and nothing is applied.
pub fn apply_all(current: &ServiceTable, ops: &[Op]) -> Result<ServiceTable, PlanError> {
    let mut t = current.clone();
    for op in ops {
        t = t.apply(op).map_err(PlanError::Invalid)?;
    }
    Ok(t)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("service {0} is listed twice")]
    DuplicateService(Frontend),
    #[error(transparent)]
    Invalid(ConfigError),
}

/// One line of an apply's diff, as `lbctl apply` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<'a>(pub &'a Op);

impl fmt::Display for Change<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Op::AddService {
                frontend,
                backends,
                options,
            } => {
                write!(
                    f,
                    "+ service {frontend} with {}",
                    backends
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )?;
                if !options.is_default() {
                    write!(
                        f,
                        " (mode {}, affinity {})",
                        options.mode_label(),
                        options.affinity
                    )?;
                }
                Ok(())
            }
            Op::RemoveService { frontend } => write!(f, "- service {frontend}"),
            Op::SetOptions { frontend, options } => {
                write!(
                    f,
                    "~ service {frontend} options: mode {}",
                    options.mode_label()
                )?;
                write!(f, ", affinity {}", options.affinity)?;
                if let Some(t) = options.affinity_timeout_s {
                    write!(f, " ({t} s)")?;
                }
                write!(f, ", on-remove {}", options.on_remove)?;
                if let Some(m) = options.table_size {
                    write!(f, ", table size {m}")?;
                }
                Ok(())
            }
            Op::AddBackend { frontend, backend } => {
                write!(f, "+ backend {backend} of {frontend}")
            }
            Op::RemoveBackend {
                frontend,
                addr,
                port,
            } => write!(f, "- backend {addr}:{port} of {frontend}"),
            Op::SetWeight {
                frontend,
                addr,
                port,
                weight,
            } => write!(f, "~ backend {addr}:{port} of {frontend}: weight {weight}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb::service::Mode;

    fn table(yaml: &str) -> ServiceTable {
        let d = DesiredState::parse(yaml, Format::Yaml).expect("yaml");
        let ops = plan(&ServiceTable::default(), &d).expect("plan");
        apply_all(&ServiceTable::default(), &ops).expect("valid")
    }

    const TWO: &str = "
services:
  - frontend: 10.96.0.10:80/tcp
    backends: [10.1.0.11:8080, 10.1.0.12:8080@2]
  - frontend: 10.96.0.10:53/udp
    backends: [10.1.0.11:5353]
    options: {affinity: client-ip}
";

    #[test]
    fn a_file_round_trips_through_export() {
        let t = table(TWO);
        let d = DesiredState::of(&t, &HealthChecks::new());
        assert_eq!(d.services.len(), 2);
        for format in [Format::Yaml, Format::Json] {
            let text = d.to_text(format).expect("text");
            let back = DesiredState::parse(&text, format).expect("parse");
            assert_eq!(back, d, "{text}");
            // Applying what was exported changes nothing.
            assert_eq!(plan(&t, &back).expect("plan"), Vec::<Op>::new());
        }
        let yaml = d.to_text(Format::Yaml).expect("yaml");
        assert!(yaml.contains("10.1.0.12:8080@2"), "{yaml}");
        assert!(yaml.contains("affinity: client-ip"), "{yaml}");
    }

    #[test]
    fn errors_name_the_line_and_unknown_keys_are_errors() {
        let bad = "services:\n  - frontend: 10.96.0.10:80/tcp\n    backend: [10.1.0.11:8080]\n";
        let e = DesiredState::parse(bad, Format::Yaml).expect_err("unknown key");
        assert!(e.contains("backend") && e.contains("line 3"), "{e}");
        let bad = "services:\n  - frontend: 10.96.0.10:80\n";
        let e = DesiredState::parse(bad, Format::Yaml).expect_err("no proto");
        assert!(e.contains("not a frontend") && e.contains("line 2"), "{e}");
        let e = DesiredState::parse("{\"services\": [\n{\"frontend\": 1}]}", Format::Json)
            .expect_err("json");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn the_plan_changes_only_what_differs_and_keeps_unchanged_services() {
        let t = table(TWO);
        let id = |t: &ServiceTable, f: &str| t.get(&f.parse().expect("fe")).map(|s| s.id);
        let next = "
services:
  - frontend: 10.96.0.10:80/tcp
    backends: [10.1.0.12:8080@3, 10.1.0.13:8080]
  - frontend: 10.96.0.10:53/udp
    backends: [10.1.0.11:5353]
    options: {affinity: client-ip}
  - frontend: 10.96.0.11:443/tcp
    backends: [10.1.0.11:443]
    options: {mode: dsr-l2}
";
        let d = DesiredState::parse(next, Format::Yaml).expect("yaml");
        let ops = plan(&t, &d).expect("plan");
        let lines: Vec<String> = ops.iter().map(|o| Change(o).to_string()).collect();
        assert_eq!(
            lines,
            [
                "- backend 10.1.0.11:8080 of 10.96.0.10:80/tcp",
                "~ backend 10.1.0.12:8080 of 10.96.0.10:80/tcp: weight 3",
                "+ backend 10.1.0.13:8080@1 of 10.96.0.10:80/tcp",
                "+ service 10.96.0.11:443/tcp with 10.1.0.11:443@1 (mode dsr-l2, affinity none)",
            ]
        );
        let t2 = apply_all(&t, &ops).expect("valid");
        assert_eq!(DesiredState::of(&t2, &HealthChecks::new()), {
            let mut d = d.clone();
            d.services.sort_by_key(|s| s.frontend);
            d
        });
        // The UDP service did not change: same id, so the same Maglev table and flows.
        assert_eq!(id(&t2, "10.96.0.10:53/udp"), id(&t, "10.96.0.10:53/udp"));
        assert_eq!(id(&t2, "10.96.0.10:80/tcp"), id(&t, "10.96.0.10:80/tcp"));
        // Removing everything.
        let ops = plan(&t2, &DesiredState::default()).expect("plan");
        assert_eq!(ops.len(), 3);
        assert!(apply_all(&t2, &ops).expect("valid").is_empty());
    }

    #[test]
    fn a_mode_and_backend_change_together_replaces_the_service() {
        // SNAT on 8080 → DSR on 80: neither order of options and backends validates.
        let t = table("services: [{frontend: 10.96.0.10:80/tcp, backends: [10.1.0.11:8080]}]");
        let d = DesiredState::parse(
            "services: [{frontend: 10.96.0.10:80/tcp, backends: [10.1.0.11:80], options: {mode: dsr-ipip}}]",
            Format::Yaml,
        )
        .expect("yaml");
        let ops = plan(&t, &d).expect("plan");
        let t2 = apply_all(&t, &ops).expect("valid");
        let s = t2
            .get(&"10.96.0.10:80/tcp".parse().expect("fe"))
            .expect("svc");
        assert_eq!(s.options.mode, Mode::DsrIpip);
        assert_eq!(s.backends[0].port, 80);
    }

    #[test]
    fn the_state_file_is_written_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("xlb-state-{}", std::process::id()));
        let path = dir.join("sub").join("state.yaml");
        assert_eq!(load(&path), Ok(None), "no file yet");
        let d = DesiredState::of(&table(TWO), &HealthChecks::new());
        prepare(&path, &d).expect("write").finish().expect("rename");
        assert_eq!(load(&path), Ok(Some(d.clone())));
        // A prepared state that is dropped (the change failed) leaves the old one and
        // no temporary file.
        drop(prepare(&path, &DesiredState::default()).expect("write"));
        assert_eq!(load(&path), Ok(Some(d)));
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, ["state.yaml"]);
        // A corrupt file is an error naming it and the line.
        std::fs::write(&path, "services:\n  - frontend: nonsense\n").expect("write");
        let e = load(&path).expect_err("corrupt");
        assert!(e.contains("state.yaml") && e.contains("line 2"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_invalid_state_is_refused_whole() {
        let t = table(TWO);
        let bad = DesiredState::parse(
            "
services:
  - frontend: 10.96.0.10:80/tcp
    backends: [10.1.0.11:8080]
  - frontend: 10.96.0.12:80/tcp
    backends: [10.1.0.11:8080@99999]
",
            Format::Yaml,
        )
        .expect("parses");
        let ops = plan(&t, &bad).expect("plan");
        let e = apply_all(&t, &ops).expect_err("weight too large");
        assert!(e.to_string().contains("99999"), "{e}");
        let dup = DesiredState::parse(
            "services: [{frontend: 10.96.0.10:80/tcp}, {frontend: 10.96.0.10:80/tcp}]",
            Format::Yaml,
        )
        .expect("parses");
        assert!(matches!(
            plan(&t, &dup),
            Err(PlanError::DuplicateService(_))
        ));
    }

    #[test]
    fn health_checks_are_part_of_the_file_and_validated() {
        let text = "services:\n  - frontend: 10.96.0.10:80/tcp\n    backends: [10.1.0.11:8080]\n    health: {probe: {type: http, path: /healthz}, interval_ms: 500, fall: 2}\n";
        let d = DesiredState::parse(text, Format::Yaml).expect("parse");
        let h = d.health().expect("valid");
        let spec = h.values().next().expect("one check");
        assert_eq!((spec.interval_ms, spec.fall, spec.rise), (500, 2, 2));
        // Exported and read back: the same.
        let t = apply_all(
            &ServiceTable::default(),
            &plan(&ServiceTable::default(), &d).expect("plan"),
        )
        .expect("table");
        let back = DesiredState::of(&t, &h);
        assert_eq!(back, d);
        for f in [Format::Yaml, Format::Json] {
            let again = DesiredState::parse(&back.to_text(f).expect("text"), f).expect("parse");
            assert_eq!(again, d);
        }
        // A check that cannot work is refused with its service; a misspelt key names itself.
        let bad = text.replace("interval_ms: 500", "interval_ms: 5");
        let e = DesiredState::parse(&bad, Format::Yaml)
            .expect("parses")
            .health()
            .expect_err("refused");
        assert!(
            e.contains("10.96.0.10:80/tcp") && e.contains("interval"),
            "{e}"
        );
        let typo = text.replace("fall: 2", "fal: 2");
        let e = DesiredState::parse(&typo, Format::Yaml).expect_err("unknown key");
        assert!(e.contains("fal"), "{e}");
    }
}
