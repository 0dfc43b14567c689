//! Reading one library crate into its module graph at file level: which module files name which.
//!
//! ```text
//!   lib.rs ──mod──▶ capture/mod.rs ──mod──▶ capture/cow.rs      `mod x;` finds the files (1)
//!                        │  ▲                   │
//!                        │  └─ use super::CaptureError            every `use` and every path
//!                        └──── cow::CowError ───┘                 names a module (2, 3)
//! ```
//!
//! 1. Starting at `lib.rs`, every `mod x;` that is not test-only leads to `x.rs` or `x/mod.rs` (or
//!    its `#[path]`). Each file is a node; inline `mod x { .. }` blocks are modules too, but they
//!    belong to the node of their file. `main.rs` and `bin/` are other crates that only import
//!    the library, and are not read.
//! 2. Every `use` in a module (at any depth, even inside a function body) binds a name, so that
//!    a later `cow::CowTracker::arm(..)` after `use crate::capture::cow;` is followed.
//! 3. Every `use` leaf and every path of two or more segments that starts with `crate`, `self`,
//!    `super`, a child module or a name bound by a `use` is made absolute and resolved to the
//!    LONGEST prefix that is a module file: `crate::capture::CaptureError` names `capture`,
//!    `crate::capture::cow::CowError` names `capture::cow`. That is an edge from the file that
//!    wrote the path, unless it names the file itself. A `mod x;` declaration is not an edge.
//!
//! Steps 2 and 3 are in `resolve.rs`, with what they leave out (code under `#[cfg(test)]`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use syn::ext::IdentExt;
use syn::{Attribute, Item, Meta};

pub use crate::resolve::Reference;
use crate::resolve::{is_test_only, ModPath, Pass, Scopes, Walker};

/// Why a crate's sources could not be read into a module graph.
#[derive(Debug, thiserror::Error)]
pub enum ModuleGraphError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {}:{line}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: syn::Error,
    },
    #[error("{} declares `mod {name};` but there is no {}", declared_in.display(), list_paths(tried))]
    MissingModule {
        declared_in: PathBuf,
        name: String,
        tried: Vec<PathBuf>,
    },
}

fn list_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(" or ")
}

/// The name of a module as the report writes it: `capture::cow`, or `crate` for the root.
pub fn module_name(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_string()
    } else {
        path.join("::")
    }
}

/// One module file: a node of the graph.
#[derive(Debug)]
pub struct ModuleFile {
    /// `capture::cow`, or `crate` for `lib.rs`.
    pub name: String,
    /// The file as the report shows it: `vmm/src/capture/cow.rs`.
    pub shown_path: String,
}

/// A crate's module files and which of them name which.
#[derive(Debug)]
pub struct ModuleGraph {
    /// The nodes, sorted by name; an edge refers to a module by its index here.
    pub modules: Vec<ModuleFile>,
    /// `(from, to)` to the places in `from` that name `to`, in source order.
    pub edges: BTreeMap<(usize, usize), Vec<Reference>>,
}

impl ModuleGraph {
    /// Reads the library crate whose `lib.rs` is in `src_dir`; `shown_root` (such as `vmm/src`)
    /// prefixes the file names in reports.
    pub fn read(src_dir: &Path, shown_root: &str) -> Result<Self, ModuleGraphError> {
        let files = load_files(src_dir)?;
        Ok(Self::build(&files, shown_root))
    }

    fn build(files: &[SourceFile], shown_root: &str) -> Self {
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by(|&a, &b| files[a].module.cmp(&files[b].module));
        let mut node_of = vec![0; files.len()];
        for (node, &file) in order.iter().enumerate() {
            node_of[file] = node;
        }
        let modules = order
            .iter()
            .map(|&f| ModuleFile {
                name: module_name(&files[f].module),
                shown_path: format!("{shown_root}/{}", files[f].relative.display()),
            })
            .collect();

        let mut scopes = Scopes::default();
        for (i, f) in files.iter().enumerate() {
            scopes.file_modules.insert(f.module.clone(), node_of[i]);
            scopes.all_modules.insert(f.module.clone());
            scopes.all_modules.extend(f.inline_modules.iter().cloned());
        }
        for f in files {
            let mut walker = Walker::new(Pass::Bindings, f.module.clone(), &mut scopes, 0);
            walker.walk(&f.ast);
        }
        let mut edges: BTreeMap<(usize, usize), Vec<Reference>> = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let mut walker =
                Walker::new(Pass::References, f.module.clone(), &mut scopes, node_of[i]);
            walker.walk(&f.ast);
            for (to, reference) in walker.found {
                edges.entry((node_of[i], to)).or_default().push(reference);
            }
        }
        Self { modules, edges }
    }

    /// The modules each module names, by index.
    pub fn successors(&self) -> Vec<Vec<usize>> {
        let mut succ = vec![Vec::new(); self.modules.len()];
        for &(from, to) in self.edges.keys() {
            succ[from].push(to);
        }
        succ
    }

    /// The index of the module called `name` (`capture::cow`, `crate`).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.modules.iter().position(|m| m.name == name)
    }

    /// Whether the module `from` names the module `to`.
    pub fn has_edge(&self, from: &str, to: &str) -> bool {
        match (self.index_of(from), self.index_of(to)) {
            (Some(f), Some(t)) => self.edges.contains_key(&(f, t)),
            _ => false,
        }
    }

    /// The graph as a sorted list, one `module -> dep, dep` line per module.
    pub fn render_list(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.modules.iter().enumerate() {
            let deps: BTreeSet<&str> = self
                .edges
                .keys()
                .filter(|&&(from, _)| from == i)
                .map(|&(_, to)| self.modules[to].name.as_str())
                .collect();
            let deps: Vec<&str> = deps.into_iter().collect();
            let deps = if deps.is_empty() {
                "(none)".to_string()
            } else {
                deps.join(", ")
            };
            let _ = writeln!(out, "{} -> {deps}", m.name);
        }
        out
    }
}

/// One parsed module file.
struct SourceFile {
    module: ModPath,
    /// Relative to the crate's `src`.
    relative: PathBuf,
    /// The non-test inline `mod x { .. }` blocks in it, as absolute module paths.
    inline_modules: Vec<ModPath>,
    ast: syn::File,
}

/// Follows the `mod x;` declarations from `lib.rs`, skipping test-only ones.
fn load_files(src_dir: &Path) -> Result<Vec<SourceFile>, ModuleGraphError> {
    // (file on disk, its module, the directory its `mod x;` children are in)
    let mut pending = vec![(
        src_dir.join("lib.rs"),
        ModPath::new(),
        src_dir.to_path_buf(),
    )];
    let mut files = Vec::new();
    while let Some((path, module, child_dir)) = pending.pop() {
        let text = std::fs::read_to_string(&path).map_err(|source| ModuleGraphError::Read {
            path: path.clone(),
            source,
        })?;
        let ast = syn::parse_file(&text).map_err(|source| ModuleGraphError::Parse {
            path: path.clone(),
            line: source.span().start().line,
            source,
        })?;
        let file_dir = path.parent().unwrap_or(src_dir).to_path_buf();
        let mut inline_modules = Vec::new();
        find_child_modules(
            &ast.items,
            &ChildSearch {
                declared_in: &path,
                file_dir: &file_dir,
                child_dir: &child_dir,
                module: &module,
            },
            &mut inline_modules,
            &mut pending,
        )?;
        let relative = path.strip_prefix(src_dir).unwrap_or(&path).to_path_buf();
        files.push(SourceFile {
            module,
            relative,
            inline_modules,
            ast,
        });
    }
    Ok(files)
}

/// Where `find_child_modules` is looking.
struct ChildSearch<'a> {
    declared_in: &'a Path,
    /// The directory of the file: `#[path]` is relative to it.
    file_dir: &'a Path,
    /// The directory where `mod x;` looks for `x.rs` and `x/mod.rs`.
    child_dir: &'a Path,
    module: &'a [String],
}

fn find_child_modules(
    items: &[Item],
    at: &ChildSearch<'_>,
    inline_modules: &mut Vec<ModPath>,
    pending: &mut Vec<(PathBuf, ModPath, PathBuf)>,
) -> Result<(), ModuleGraphError> {
    for item in items {
        let Item::Mod(m) = item else { continue };
        if is_test_only(&m.attrs) {
            continue;
        }
        let name = m.ident.unraw().to_string();
        let mut module = at.module.to_vec();
        module.push(name.clone());
        let child_dir = at.child_dir.join(&name);
        if let Some((_, items)) = &m.content {
            inline_modules.push(module.clone());
            let inner = ChildSearch {
                child_dir: &child_dir,
                module: &module,
                ..*at
            };
            find_child_modules(items, &inner, inline_modules, pending)?;
            continue;
        }
        let (file, grandchild_dir) = match path_attribute(&m.attrs) {
            Some(p) => {
                let file = at.file_dir.join(p);
                let dir = file.parent().unwrap_or(at.file_dir).to_path_buf();
                (file, dir)
            }
            None => {
                let tried = vec![
                    at.child_dir.join(format!("{name}.rs")),
                    child_dir.join("mod.rs"),
                ];
                let Some(file) = tried.iter().find(|p| p.is_file()).cloned() else {
                    return Err(ModuleGraphError::MissingModule {
                        declared_in: at.declared_in.to_path_buf(),
                        name,
                        tried,
                    });
                };
                (file, child_dir)
            }
        };
        pending.push((file, module, grandchild_dir));
    }
    Ok(())
}

fn path_attribute(attrs: &[Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| match &a.meta {
        Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    })
}
