//! Which module files a file's `use`s and paths name: steps 2 and 3 of `scan.rs`, a walk of
//! each file's syntax tree that knows the module it is in, what each `use` binds, and the
//! crate's module files.
//!
//! Left out on purpose:
//! - Items under a `cfg` that needs `test` (`#[cfg(test)] mod tests { use super::*; }`, a
//!   `#[cfg(test)] mod x_tests;` file, a `#[cfg(test)] use`): test code may import anything, and
//!   `super::` inside an inline `mod tests` names its own file. Test-only files are never read.
//! - `macro_rules!` bodies: their paths resolve where the macro is called. Paths inside macro
//!   calls (`format!("{}", crate::x::Y)`) are found by scanning the tokens for `a::b` runs.
//! - Doc links, attributes and `pub(in path)` visibilities, which import nothing. Also `cfg`
//!   attributes on expressions (only items, fields, variants, arms and `let`s are checked).
//! - A `#[macro_export]` macro lives at the crate root, so `crate::outln!` names `lib.rs`, not
//!   the file that defines it.
//!
//! A `pub use child::Item` re-export in a parent (of something inside its own subtree) is not an
//! edge: the parent owns the child anyway. Any other `pub use` counts like a plain `use`.

use std::collections::{HashMap, HashSet};

use proc_macro2::{Spacing, TokenStream, TokenTree};
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};
use syn::{Attribute, Item, Meta, UseTree};

/// A module path inside its crate, without `crate`: `["capture", "cow"]`; the root is `[]`.
pub type ModPath = Vec<String>;

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

/// Whether a `cfg` among `attrs` needs `test`: `cfg(test)`, `cfg(all(test, ..))`.
pub fn is_test_only(attrs: &[Attribute]) -> bool {
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
pub struct Scopes {
    /// Module files, to their node index.
    pub file_modules: HashMap<ModPath, usize>,
    /// Module files and inline modules.
    pub all_modules: HashSet<ModPath>,
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
pub enum Pass {
    /// Records what each `use` binds.
    Bindings,
    /// Records the modules that each `use` and path names.
    References,
}

/// Walks one file's syntax tree, keeping track of the module it is in.
pub struct Walker<'a> {
    pass: Pass,
    /// The current module: the file's module, plus any inline modules around this point.
    scope: ModPath,
    scopes: &'a mut Scopes,
    /// This file's node.
    node: usize,
    /// (module named, where) in source order.
    pub found: Vec<(usize, Reference)>,
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
    pub fn new(pass: Pass, scope: ModPath, scopes: &'a mut Scopes, node: usize) -> Self {
        Self {
            pass,
            scope,
            scopes,
            node,
            found: Vec::new(),
        }
    }

    /// Walks a whole file.
    pub fn walk(&mut self, file: &syn::File) {
        self.visit_file(file);
    }

    /// Records an edge if `segments`, written here, name another module file of the crate.
    /// Whether `segments` names something inside the current module's own subtree.
    fn is_descendant(&self, segments: &[String]) -> bool {
        self.scopes
            .absolute(&self.scope, segments, MAX_BINDING_DEPTH)
            .is_some_and(|path| path.len() > self.scope.len() + 1 && path.starts_with(&self.scope))
    }

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
                Pass::References => {
                    if !matches!(u.vis, syn::Visibility::Inherited)
                        && self.is_descendant(&leaf.segments)
                    {
                        // `pub use child::X` in a parent is a facade over its own subtree, not
                        // a dependency: the parent owns the child whether or not it re-exports.
                        continue;
                    }
                    self.reference(&leaf.segments, leaf.line, leaf.text, true)
                }
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
