//! Reading one library crate into its module graph at file level: which module files name which.
//!
//! ```text
//!   lib.rs ──mod──▶ capture/mod.rs ──mod──▶ capture/cow.rs      `mod x;` finds the files (pass 1)
//!                        │  ▲                   │
//!                        │  └─ use super::CaptureError            every `use` and every path
//!                        └──── cow::CowError ───┘                 names a module (pass 2, 3)
//! ```
//!
//! 1. Starting at `lib.rs`, every `mod x;` that is not test-only leads to `x.rs` or `x/mod.rs` (or
//!    its `#[path]`). Each file is a node; inline `mod x { .. }` blocks are modules too, but they
//!    belong to the node of their file.
//! 2. Every `use` in a module (at any depth, even inside a function body) binds a name, so that
//!    a later `cow::CowTracker::arm(..)` after `use crate::capture::cow;` is followed.
//! 3. Every `use` leaf and every path of two or more segments that starts with `crate`, `self`,
//!    `super`, a child module or a name bound by a `use` is made absolute and resolved to the
//!    LONGEST prefix that is a module file: `crate::capture::CaptureError` names `capture`,
//!    `crate::capture::cow::CowError` names `capture::cow`. That is an edge from the file that
//!    wrote the path, unless it names the file itself. A `mod x;` declaration is not an edge.
//!
//! Left out on purpose:
//! - Items under a `cfg` that needs `test` (`#[cfg(test)] mod tests { use super::*; }`, a
//!   `#[cfg(test)] mod x_tests;` file, a `#[cfg(test)] use`): test code may import anything, and
//!   `super::` inside an inline `mod tests` names its own file. Test-only files are never read.
//! - `main.rs` and `bin/`: other crates that only import the library.
//! - `macro_rules!` bodies: their paths resolve where the macro is called. Paths inside macro
//!   calls (`format!("{}", crate::x::Y)`) are found by scanning the tokens for `a::b` runs.
//! - Doc links, attributes and `pub(in path)` visibilities, which import nothing. Also `cfg`
//!   attributes on expressions (only items, fields, variants, arms and `let`s are checked).
//! - A `#[macro_export]` macro lives at the crate root, so `crate::outln!` names `lib.rs`, not
//!   the file that defines it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proc_macro2::{Spacing, TokenStream, TokenTree};
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};
use syn::{Attribute, Item, Meta, UseTree};

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

/// A module path inside its crate, without `crate`: `["capture", "cow"]`; the root is `[]`.
type ModPath = Vec<String>;

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

/// Where a file names another module: one reason for an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub line: usize,
    /// The path as written, without generic arguments: `use crate::capture::cow::CowError` or
    /// `super::precopy::start_precopy`.
    pub text: String,
    /// Whether the path starts with a name that a `use` brought in (`CaptureError::Cancelled`
    /// after `use super::CaptureError`), so that the `use` is usually the reference to move.
    pub via_import: bool,
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
            walker.visit_file(&f.ast);
        }
        let mut edges: BTreeMap<(usize, usize), Vec<Reference>> = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let mut walker =
                Walker::new(Pass::References, f.module.clone(), &mut scopes, node_of[i]);
            walker.visit_file(&f.ast);
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

/// Whether a `cfg` among `attrs` needs `test`: `cfg(test)`, `cfg(all(test, ..))`.
fn is_test_only(attrs: &[Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().is_ident("cfg") && a.parse_args::<Meta>().is_ok_and(|m| needs_test(&m)))
}

fn needs_test(meta: &Meta) -> bool {
    match meta {
        Meta::Path(p) => p.is_ident("test"),
        Meta::List(list) => {
            let Ok(inner) =
                list.parse_args_with(Punctuated::<Meta, syn::Token![,]>::parse_terminated)
            else {
                return false;
            };
            if list.path.is_ident("all") {
                inner.iter().any(needs_test)
            } else if list.path.is_ident("any") {
                !inner.is_empty() && inner.iter().all(needs_test)
            } else {
                false
            }
        }
        Meta::NameValue(_) => false,
    }
}

/// What the crate's modules are and what each module's `use`s bind.
#[derive(Default)]
struct Scopes {
    /// Module files, to their node index.
    file_modules: HashMap<ModPath, usize>,
    /// Module files and inline modules.
    all_modules: HashSet<ModPath>,
    /// For each module, the names its `use`s bind, to the path as written there.
    bindings: HashMap<ModPath, HashMap<String, Vec<String>>>,
    /// For each module, the paths of its `use x::*`, as written there.
    globs: HashMap<ModPath, Vec<Vec<String>>>,
}

/// How deep `absolute` follows `use` bindings of bindings.
const MAX_BINDING_DEPTH: u32 = 8;

impl Scopes {
    /// `segments` written in module `scope`, as a path from the crate root; `None` when it is not
    /// a path into this crate (another crate, a local name, `std`).
    fn absolute(&self, scope: &[String], segments: &[String], depth: u32) -> Option<ModPath> {
        let (first, rest) = segments.split_first()?;
        let join = |mut base: ModPath, rest: &[String]| {
            base.extend(rest.iter().cloned());
            base
        };
        match first.as_str() {
            "crate" => Some(rest.to_vec()),
            "self" => Some(join(scope.to_vec(), rest)),
            "super" => {
                let mut base = scope.to_vec();
                base.pop()?;
                let mut rest = rest;
                while let Some(("super", tail)) = rest.split_first().map(|(h, t)| (h.as_str(), t)) {
                    base.pop()?;
                    rest = tail;
                }
                Some(join(base, rest))
            }
            _ => {
                let mut child = scope.to_vec();
                child.push(first.clone());
                if self.all_modules.contains(&child) {
                    return Some(join(child, rest));
                }
                if depth == 0 {
                    return None;
                }
                if let Some(bound) = self.bindings.get(scope).and_then(|b| b.get(first)) {
                    let target = self.absolute(scope, bound, depth - 1)?;
                    return Some(join(target, rest));
                }
                // A module brought in by `use some::module::*`.
                for glob in self.globs.get(scope).into_iter().flatten() {
                    if let Some(mut target) = self.absolute(scope, glob, depth - 1) {
                        target.push(first.clone());
                        if self.all_modules.contains(&target) {
                            return Some(join(target, rest));
                        }
                    }
                }
                None
            }
        }
    }

    /// The module file that holds the longest prefix of `path`.
    fn file_of(&self, path: &[String]) -> Option<usize> {
        (0..=path.len())
            .rev()
            .find_map(|k| self.file_modules.get(&path[..k]).copied())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Records what each `use` binds.
    Bindings,
    /// Records the modules that each `use` and path names.
    References,
}

/// Walks one file's syntax tree, keeping track of the module it is in.
struct Walker<'a> {
    pass: Pass,
    /// The current module: the file's module, plus any inline modules around this point.
    scope: ModPath,
    scopes: &'a mut Scopes,
    /// This file's node.
    node: usize,
    /// (module named, where) in source order.
    found: Vec<(usize, Reference)>,
}

/// One leaf of a `use` tree, flattened: `use crate::{a::X, b as c, d::*}` has three.
struct UseLeaf {
    segments: Vec<String>,
    /// The name it binds, or `None` for a glob.
    binds: Option<String>,
    line: usize,
    text: String,
}

fn flatten_use(tree: &UseTree, prefix: &mut Vec<String>, leaves: &mut Vec<UseLeaf>) {
    let full = |prefix: &[String], last: &str| {
        let mut s = prefix.to_vec();
        if last != "self" {
            s.push(last.to_string());
        }
        s
    };
    match tree {
        UseTree::Path(p) => {
            prefix.push(p.ident.unraw().to_string());
            flatten_use(&p.tree, prefix, leaves);
            prefix.pop();
        }
        UseTree::Name(n) => {
            let name = n.ident.unraw().to_string();
            let segments = full(prefix, &name);
            let binds = segments.last().cloned();
            leaves.push(UseLeaf {
                text: format!("use {}", segments.join("::")),
                line: n.ident.span().start().line,
                segments,
                binds,
            });
        }
        UseTree::Rename(r) => {
            let segments = full(prefix, &r.ident.unraw().to_string());
            let alias = r.rename.unraw().to_string();
            leaves.push(UseLeaf {
                text: format!("use {} as {alias}", segments.join("::")),
                line: r.ident.span().start().line,
                segments,
                binds: Some(alias),
            });
        }
        UseTree::Glob(g) => leaves.push(UseLeaf {
            text: format!("use {}::*", prefix.join("::")),
            line: g.star_token.span.start().line,
            segments: prefix.clone(),
            binds: None,
        }),
        UseTree::Group(g) => {
            for t in &g.items {
                flatten_use(t, prefix, leaves);
            }
        }
    }
}

impl<'a> Walker<'a> {
    fn new(pass: Pass, scope: ModPath, scopes: &'a mut Scopes, node: usize) -> Self {
        Self {
            pass,
            scope,
            scopes,
            node,
            found: Vec::new(),
        }
    }

    /// Records an edge if `segments`, written here, name another module file of the crate.
    fn reference(&mut self, segments: &[String], line: usize, text: String, is_use: bool) {
        let Some(path) = self
            .scopes
            .absolute(&self.scope, segments, MAX_BINDING_DEPTH)
        else {
            return;
        };
        let Some(to) = self.scopes.file_of(&path) else {
            return;
        };
        if to == self.node {
            return;
        }
        let via_import = !is_use
            && segments.first().is_some_and(|first| {
                let mut child = self.scope.clone();
                child.push(first.clone());
                !matches!(first.as_str(), "crate" | "self" | "super")
                    && !self.scopes.all_modules.contains(&child)
            });
        self.found.push((
            to,
            Reference {
                line,
                text,
                via_import,
            },
        ));
    }

    /// Paths written inside a macro call's tokens: runs of `a::b::c` not preceded by `::`.
    fn scan_tokens(&mut self, tokens: TokenStream, macro_name: &str) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            if let TokenTree::Group(g) = &tokens[i] {
                self.scan_tokens(g.stream(), macro_name);
                i += 1;
                continue;
            }
            let TokenTree::Ident(first) = &tokens[i] else {
                i += 1;
                continue;
            };
            let after_colons = i >= 2 && is_colon2(&tokens[i - 2], &tokens[i - 1]);
            let after_dollar =
                i >= 1 && matches!(&tokens[i - 1], TokenTree::Punct(p) if p.as_char() == '$');
            let mut segments = vec![first.unraw().to_string()];
            let mut j = i + 1;
            while j + 2 < tokens.len() && is_colon2(&tokens[j], &tokens[j + 1]) {
                let TokenTree::Ident(next) = &tokens[j + 2] else {
                    break;
                };
                segments.push(next.unraw().to_string());
                j += 3;
            }
            if segments.len() >= 2 && !after_colons && !after_dollar {
                let line = first.span().start().line;
                let text = format!("{} (in {macro_name}!)", segments.join("::"));
                self.reference(&segments, line, text, false);
            }
            i = j;
        }
    }
}

fn is_colon2(a: &TokenTree, b: &TokenTree) -> bool {
    matches!((a, b), (TokenTree::Punct(p), TokenTree::Punct(q))
        if p.as_char() == ':' && p.spacing() == Spacing::Joint && q.as_char() == ':')
}

fn item_attrs(item: &Item) -> &[Attribute] {
    match item {
        Item::Const(i) => &i.attrs,
        Item::Enum(i) => &i.attrs,
        Item::ExternCrate(i) => &i.attrs,
        Item::Fn(i) => &i.attrs,
        Item::ForeignMod(i) => &i.attrs,
        Item::Impl(i) => &i.attrs,
        Item::Macro(i) => &i.attrs,
        Item::Mod(i) => &i.attrs,
        Item::Static(i) => &i.attrs,
        Item::Struct(i) => &i.attrs,
        Item::Trait(i) => &i.attrs,
        Item::TraitAlias(i) => &i.attrs,
        Item::Type(i) => &i.attrs,
        Item::Union(i) => &i.attrs,
        Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

fn path_segments(path: &syn::Path) -> Vec<String> {
    path.segments
        .iter()
        .map(|s| s.ident.unraw().to_string())
        .collect()
}

impl<'ast> Visit<'ast> for Walker<'_> {
    fn visit_item(&mut self, item: &'ast Item) {
        if is_test_only(item_attrs(item)) {
            return;
        }
        if let Item::Macro(m) = item {
            if m.mac.path.is_ident("macro_rules") {
                return;
            }
        }
        visit::visit_item(self, item);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // `mod x;` is a declaration, not an import; `mod x { .. }` is a scope of its own.
        if let Some((_, items)) = &m.content {
            self.scope.push(m.ident.unraw().to_string());
            for item in items {
                self.visit_item(item);
            }
            self.scope.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut leaves = Vec::new();
        flatten_use(&u.tree, &mut Vec::new(), &mut leaves);
        for leaf in leaves {
            match self.pass {
                Pass::Bindings => match leaf.binds {
                    Some(name) => {
                        self.scopes
                            .bindings
                            .entry(self.scope.clone())
                            .or_default()
                            .insert(name, leaf.segments);
                    }
                    None => {
                        self.scopes
                            .globs
                            .entry(self.scope.clone())
                            .or_default()
                            .push(leaf.segments);
                    }
                },
                Pass::References => self.reference(&leaf.segments, leaf.line, leaf.text, true),
            }
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        // One segment is a local name, `self` the receiver, or a name a `use` already counted.
        if self.pass == Pass::References && path.leading_colon.is_none() && path.segments.len() >= 2
        {
            let segments = path_segments(path);
            let line = path.segments[0].ident.span().start().line;
            let text = segments.join("::");
            self.reference(&segments, line, text, false);
        }
        visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.visit_path(&mac.path);
        if self.pass == Pass::References {
            let name = path_segments(&mac.path).join("::");
            self.scan_tokens(mac.tokens.clone(), &name);
        }
    }

    fn visit_attribute(&mut self, _: &'ast Attribute) {}

    fn visit_vis_restricted(&mut self, _: &'ast syn::VisRestricted) {}

    fn visit_impl_item(&mut self, item: &'ast syn::ImplItem) {
        let attrs = match item {
            syn::ImplItem::Const(i) => &i.attrs,
            syn::ImplItem::Fn(i) => &i.attrs,
            syn::ImplItem::Type(i) => &i.attrs,
            syn::ImplItem::Macro(i) => &i.attrs,
            _ => return visit::visit_impl_item(self, item),
        };
        if !is_test_only(attrs) {
            visit::visit_impl_item(self, item);
        }
    }

    fn visit_trait_item(&mut self, item: &'ast syn::TraitItem) {
        let attrs = match item {
            syn::TraitItem::Const(i) => &i.attrs,
            syn::TraitItem::Fn(i) => &i.attrs,
            syn::TraitItem::Type(i) => &i.attrs,
            syn::TraitItem::Macro(i) => &i.attrs,
            _ => return visit::visit_trait_item(self, item),
        };
        if !is_test_only(attrs) {
            visit::visit_trait_item(self, item);
        }
    }

    fn visit_field(&mut self, f: &'ast syn::Field) {
        if !is_test_only(&f.attrs) {
            visit::visit_field(self, f);
        }
    }

    fn visit_variant(&mut self, v: &'ast syn::Variant) {
        if !is_test_only(&v.attrs) {
            visit::visit_variant(self, v);
        }
    }

    fn visit_arm(&mut self, a: &'ast syn::Arm) {
        if !is_test_only(&a.attrs) {
            visit::visit_arm(self, a);
        }
    }

    fn visit_local(&mut self, l: &'ast syn::Local) {
        if !is_test_only(&l.attrs) {
            visit::visit_local(self, l);
        }
    }

    fn visit_stmt_macro(&mut self, m: &'ast syn::StmtMacro) {
        if !is_test_only(&m.attrs) {
            visit::visit_stmt_macro(self, m);
        }
    }
}
