//! No circles of module imports in the library crates: a test that fails, naming the file, line
//! and path of every import in the circle, when two module files of a crate import each other
//! directly or through others.
//!
//! The graph is at file level: `capture/mod.rs` is `capture`, `capture/cow.rs` is
//! `capture::cow`, `lib.rs` is `crate`. An edge is a `use` or a path in code that names another
//! module file, resolved to the longest existing module (`scan.rs` says how, and what it leaves
//! out: code under `#[cfg(test)]`, `main.rs`, `macro_rules!` bodies). A parent whose `mod.rs`
//! names a child's type while the child uses the parent's error type is a circle of two; the
//! fix is a file of their own for the shared types.
//!
//! `ARKVM_MODULE_GRAPH=1` also prints the `vmm` graph as `module -> dep, dep` lines for
//! docs/ARCHITECTURE.md (`scripts/module-graph` does that).

#[path = "module_graph/cycles.rs"]
mod cycles;
#[path = "module_graph/resolve.rs"]
mod resolve;
#[path = "module_graph/scan.rs"]
mod scan;

use std::path::Path;

use scan::ModuleGraph;

/// The library crates of the workspace, by directory.
const LIBRARY_CRATES: [&str; 3] = ["vmm", "devices", "snapshot"];

/// The error and its chain of sources as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

fn read_graph(src_dir: &Path, shown_root: &str) -> ModuleGraph {
    ModuleGraph::read(src_dir, shown_root).unwrap_or_else(|e| panic!("{}", error_chain(&e)))
}

#[test]
fn library_crates_have_no_circles_of_module_imports() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let print_vmm = std::env::var("ARKVM_MODULE_GRAPH").is_ok_and(|v| v == "1");
    let mut failures = String::new();
    for name in LIBRARY_CRATES {
        let graph = read_graph(&workspace.join(name).join("src"), &format!("{name}/src"));
        // A walk that found nothing would pass without checking anything.
        assert!(
            graph.modules.len() > 3 && !graph.edges.is_empty(),
            "{name}: found only {} module files and {} imports; is {name}/src/lib.rs there?",
            graph.modules.len(),
            graph.edges.len()
        );
        if name == "vmm" && print_vmm {
            println!("Module graph of vmm (module -> the modules it imports):\n");
            print!("{}", graph.render_list());
            println!();
        }
        let found = cycles::circles(&graph.successors());
        if !found.is_empty() {
            failures.push_str(&cycles::report(name, &graph, &found));
            failures.push('\n');
        }
    }
    assert!(failures.is_empty(), "\n{failures}");
}

#[cfg(test)]
mod tests {
    //! The checker on small source trees written to a scratch directory, to show that it fails
    //! when it should and resolves each kind of path.

    use arkvm_tests::ScratchDir;

    use super::cycles::{circles, report, simple_circles};
    use super::scan::{ModuleGraph, ModuleGraphError, Reference};

    /// Writes `files` (path under `src/`, contents) and reads them back as a graph.
    fn graph_of(files: &[(&str, &str)]) -> ModuleGraph {
        let dir = ScratchDir::new("module-graph");
        for (path, text) in files {
            let path = dir.path().join("src").join(path);
            let parent = path.parent().expect("a file under src/ has a parent");
            std::fs::create_dir_all(parent).expect("create the synthetic source directory");
            std::fs::write(&path, text).expect("write a synthetic source file");
        }
        ModuleGraph::read(&dir.path().join("src"), "t/src").expect("read the synthetic crate")
    }

    fn circle_names(graph: &ModuleGraph) -> Vec<Vec<String>> {
        circles(&graph.successors())
            .iter()
            .map(|c| c.iter().map(|&i| graph.modules[i].name.clone()).collect())
            .collect()
    }

    fn refs(graph: &ModuleGraph, from: &str, to: &str) -> Vec<Reference> {
        let f = graph.index_of(from).expect("from module exists");
        let t = graph.index_of(to).expect("to module exists");
        graph.edges.get(&(f, t)).cloned().unwrap_or_default()
    }

    fn texts(graph: &ModuleGraph, from: &str, to: &str) -> Vec<String> {
        refs(graph, from, to).into_iter().map(|r| r.text).collect()
    }

    #[test]
    fn a_circle_between_siblings_is_reported_with_the_imports_that_make_it() {
        let g = graph_of(&[
            ("lib.rs", "//! root\npub mod a;\npub mod b;\n"),
            (
                "a.rs",
                "//! a\nuse crate::b::B;\npub struct A(B);\n\npub fn g() -> A {\n    A(B::make())\n}\n",
            ),
            (
                "b.rs",
                "//! b\npub struct B;\n\npub fn f() {\n    let _ = crate::a::A(B);\n}\n\n\
                 impl B { pub fn make() -> B { B } }\n",
            ),
        ]);
        assert_eq!(
            circle_names(&g),
            vec![vec!["a".to_string(), "b".to_string()]]
        );
        assert_eq!(
            refs(&g, "a", "b"),
            vec![
                Reference {
                    line: 2,
                    text: "use crate::b::B".into(),
                    via_import: false,
                },
                Reference {
                    line: 6,
                    text: "B::make".into(),
                    via_import: true,
                },
            ]
        );
        assert_eq!(
            refs(&g, "b", "a"),
            vec![Reference {
                line: 5,
                text: "crate::a::A".into(),
                via_import: false,
            }]
        );
        let found = circles(&g.successors());
        let text = report("t", &g, &found);
        assert!(text.contains("t circle 1 of 1: 2 modules: a, b"), "{text}");
        assert!(text.contains("a -> b -> a"), "{text}");
        assert!(text.contains("t/src/a.rs:2  use crate::b::B"), "{text}");
        assert!(text.contains("t/src/b.rs:5  crate::a::A"), "{text}");
        // `B::make` follows the `use` of `B`: counted, not listed.
        assert!(
            text.contains("and 1 use(s) of those names, at line(s) 6"),
            "{text}"
        );
        assert!(!text.contains("B::make"), "{text}");
    }

    #[test]
    fn a_parent_re_exporting_its_child_is_not_a_circle_but_a_plain_use_is() {
        let facade = graph_of(&[
            ("lib.rs", "//! root\npub mod p;\n"),
            (
                "p/mod.rs",
                "//! p\nmod error;\nmod k;\npub use error::PError;\npub use k::run;\n",
            ),
            ("p/error.rs", "//! e\npub struct PError;\n"),
            (
                "p/k.rs",
                "//! k\nuse super::PError;\npub fn run() -> PError {\n    PError\n}\n",
            ),
        ]);
        assert!(circle_names(&facade).is_empty());
        let plain = graph_of(&[
            ("lib.rs", "//! root\npub mod p;\n"),
            (
                "p/mod.rs",
                "//! p\nmod k;\nuse k::run;\npub struct PError;\npub fn go() {\n    run();\n}\n",
            ),
            (
                "p/k.rs",
                "//! k\nuse super::PError;\npub fn run() -> Option<PError> {\n    None\n}\n",
            ),
        ]);
        assert_eq!(circle_names(&plain).len(), 1);
        let sideways = graph_of(&[
            ("lib.rs", "//! root\npub mod a;\npub mod b;\n"),
            ("a.rs", "//! a\npub use crate::b::B;\npub struct A;\n"),
            (
                "b.rs",
                "//! b\npub struct B;\npub fn f() {\n    let _ = crate::a::A;\n}\n",
            ),
        ]);
        assert_eq!(
            circle_names(&sideways).len(),
            1,
            "a re-export of a sibling is a use"
        );
    }

    #[test]
    fn a_tree_without_a_circle_passes() {
        let g = graph_of(&[
            ("lib.rs", "//! root\npub mod a;\npub mod b;\npub mod c;\n"),
            (
                "a.rs",
                "//! a\nuse crate::b::B;\npub fn f(_: B) { crate::c::g(); }\n",
            ),
            ("b.rs", "//! b\npub struct B(pub crate::c::C);\n"),
            ("c.rs", "//! c\npub struct C;\npub fn g() {}\n"),
        ]);
        assert!(g.has_edge("a", "b") && g.has_edge("a", "c") && g.has_edge("b", "c"));
        assert!(circle_names(&g).is_empty());
    }

    #[test]
    fn a_longer_circle_is_one_group_and_its_simple_circles_are_listed() {
        let g = graph_of(&[
            (
                "lib.rs",
                "//! root\npub mod a;\npub mod b;\npub mod c;\npub mod d;\n",
            ),
            ("a.rs", "//! a\nuse crate::b::B;\n"),
            ("b.rs", "//! b\npub struct B;\nuse crate::c::C;\n"),
            (
                "c.rs",
                "//! c\npub struct C;\nuse crate::a::*;\nuse crate::b::B;\n",
            ),
            (
                "d.rs",
                "//! d: imports the circle but is not in it\nuse crate::a::*;\n",
            ),
        ]);
        assert_eq!(
            circle_names(&g),
            vec![vec!["a".to_string(), "b".to_string(), "c".to_string()]]
        );
        let found = circles(&g.successors());
        let (shown, more) = simple_circles(&g.successors(), &found[0], 10);
        let shown: Vec<Vec<&str>> = shown
            .iter()
            .map(|c| c.iter().map(|&i| g.modules[i].name.as_str()).collect())
            .collect();
        assert_eq!(shown, vec![vec!["b", "c"], vec!["a", "b", "c"]]);
        assert!(!more);
        assert_eq!(texts(&g, "c", "a"), vec!["use crate::a::*"]);
    }

    #[test]
    fn grouped_uses_resolve_each_leaf_to_the_longest_module_file() {
        let g = graph_of(&[
            ("lib.rs", "//! root\npub mod a;\npub mod b;\npub mod capture;\npub mod user;\n"),
            ("a.rs", "//! a\npub struct X;\n"),
            ("b.rs", "//! b\n"),
            (
                "capture/mod.rs",
                "//! capture\npub mod cow;\npub struct CaptureError;\n",
            ),
            ("capture/cow.rs", "//! cow\npub struct CowError;\n"),
            (
                "user.rs",
                "//! user\nuse crate::{\n    a::X,\n    b,\n    capture::{cow::CowError as E, CaptureError},\n};\n",
            ),
        ]);
        assert_eq!(texts(&g, "user", "a"), vec!["use crate::a::X"]);
        assert_eq!(texts(&g, "user", "b"), vec!["use crate::b"]);
        assert_eq!(
            texts(&g, "user", "capture::cow"),
            vec!["use crate::capture::cow::CowError as E"]
        );
        assert_eq!(
            texts(&g, "user", "capture"),
            vec!["use crate::capture::CaptureError"]
        );
        assert_eq!(refs(&g, "user", "capture")[0].line, 5);
    }

    #[test]
    fn inline_paths_super_self_and_child_names_are_resolved() {
        let g = graph_of(&[
            ("lib.rs", "//! root\npub mod capture;\npub mod runtime;\n"),
            (
                "capture/mod.rs",
                "//! capture\npub mod cow;\npub mod precopy;\npub mod job;\n\
                 pub enum CaptureError { Cow(cow::CowError), Other(self::precopy::P) }\n",
            ),
            (
                "capture/cow.rs",
                "//! cow\nuse super::CaptureError;\npub struct CowError;\n\
                 pub struct CowTracker;\nimpl CowTracker { pub fn arm() {} }\n",
            ),
            (
                "capture/precopy.rs",
                "//! precopy\npub struct P;\npub fn start_precopy() {}\n",
            ),
            (
                "capture/job.rs",
                "//! job\npub fn run() {\n    crate::capture::cow::CowTracker::arm();\n    \
                 super::precopy::start_precopy();\n}\n",
            ),
            (
                "runtime.rs",
                "//! runtime: a `use` of a module, then a path through it\nuse crate::capture;\n\
                 pub fn f() { capture::job::run(); }\n",
            ),
        ]);
        assert_eq!(texts(&g, "capture", "capture::cow"), vec!["cow::CowError"]);
        assert_eq!(
            texts(&g, "capture", "capture::precopy"),
            vec!["self::precopy::P"]
        );
        assert_eq!(
            texts(&g, "capture::cow", "capture"),
            vec!["use super::CaptureError"]
        );
        assert_eq!(
            texts(&g, "capture::job", "capture::cow"),
            vec!["crate::capture::cow::CowTracker::arm"]
        );
        assert_eq!(
            texts(&g, "capture::job", "capture::precopy"),
            vec!["super::precopy::start_precopy"]
        );
        // The path names `capture::cow`, and `capture` only as the way there.
        assert!(!g.has_edge("capture::job", "capture"));
        assert_eq!(texts(&g, "runtime", "capture"), vec!["use crate::capture"]);
        assert_eq!(
            texts(&g, "runtime", "capture::job"),
            vec!["capture::job::run"]
        );
        assert!(refs(&g, "runtime", "capture::job")[0].via_import);
        // The parent names its child's error and the child uses the parent's: a circle of two.
        assert_eq!(
            circle_names(&g),
            vec![vec!["capture".to_string(), "capture::cow".to_string()]]
        );
    }

    #[test]
    fn paths_inside_macro_calls_and_inline_modules_count() {
        let g = graph_of(&[
            ("lib.rs", "//! root\npub mod a;\npub mod b;\npub mod c;\n"),
            (
                "a.rs",
                "//! a\npub fn f() -> String {\n    format!(\"{}\", crate::b::NAME)\n}\n\
                 mod helpers {\n    use super::super::c::C;\n    pub fn g(_: C) {}\n}\n",
            ),
            ("b.rs", "//! b\npub const NAME: &str = \"b\";\n"),
            ("c.rs", "//! c\npub struct C;\n"),
        ]);
        assert_eq!(texts(&g, "a", "b"), vec!["crate::b::NAME (in format!)"]);
        assert_eq!(texts(&g, "a", "c"), vec!["use super::super::c::C"]);
        assert_eq!(refs(&g, "a", "c")[0].line, 6);
    }

    #[test]
    fn test_only_code_and_files_and_mod_declarations_are_not_imports() {
        let g = graph_of(&[
            (
                "lib.rs",
                "//! root\npub mod a;\npub mod b;\n#[cfg(test)]\nmod test_util;\n",
            ),
            (
                "a.rs",
                "//! a\npub struct A;\n\n#[cfg(test)]\nuse crate::b::B;\n\n\
                 #[cfg(all(test, target_os = \"linux\"))]\nfn helper() { crate::b::f(); }\n\n\
                 #[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::b::B;\n}\n\n\
                 #[cfg(test)]\n#[path = \"a_tests.rs\"]\nmod a_tests;\n",
            ),
            // Never read: a test-only file may even fail to parse.
            ("a_tests.rs", "this is not Rust use crate::b::B;"),
            ("test_util.rs", "//! test_util\nuse crate::a::A;\n"),
            (
                "b.rs",
                "//! b\npub struct B;\npub fn f() { let _ = crate::a::A; }\n",
            ),
        ]);
        assert!(g.has_edge("b", "a"));
        assert!(!g.has_edge("a", "b"), "{:?}", g.edges);
        assert!(g.index_of("test_util").is_none());
        // `pub mod a;` in lib.rs is a declaration, not an import.
        assert!(!g.has_edge("crate", "a"));
        assert!(circle_names(&g).is_empty());
    }

    #[test]
    fn cfg_not_test_and_any_with_another_option_still_count() {
        let g = graph_of(&[
            ("lib.rs", "//! root\npub mod a;\npub mod b;\n"),
            (
                "a.rs",
                "//! a\n#[cfg(not(test))]\nuse crate::b::B;\n\
                 #[cfg(any(test, feature = \"x\"))]\nfn f() { crate::b::g(); }\n",
            ),
            ("b.rs", "//! b\npub struct B;\npub fn g() {}\n"),
        ]);
        assert_eq!(texts(&g, "a", "b"), vec!["use crate::b::B", "crate::b::g"]);
    }

    #[test]
    fn other_crates_locals_and_self_edges_are_not_imports() {
        let g = graph_of(&[
            ("lib.rs", "//! root\npub mod a;\npub mod b;\n"),
            (
                "a.rs",
                "//! a\nuse std::collections::HashMap;\nuse snapshot::b::Thing;\n\
                 pub struct A { b: u8 }\nimpl A {\n    pub fn f(&self) -> u8 { let b = self.b; b }\n    \
                 pub fn g() -> Self { Self::new() }\n    fn new() -> Self { crate::a::A { b: 0 } }\n}\n\
                 pub fn h() { let _ = ::b::X; }\n",
            ),
            ("b.rs", "//! b\n"),
        ]);
        assert!(g.edges.is_empty(), "{:?}", g.edges);
    }

    #[test]
    fn the_vmm_style_list_is_sorted_and_shows_modules_without_imports() {
        let g = graph_of(&[
            (
                "lib.rs",
                "//! root\npub mod z;\npub mod a;\npub fn top() {}\n",
            ),
            (
                "a.rs",
                "//! a\nuse crate::z::Z;\npub fn f() { crate::top(); }\n",
            ),
            ("z.rs", "//! z\npub struct Z;\n"),
        ]);
        assert_eq!(
            g.render_list(),
            "crate -> (none)\na -> crate, z\nz -> (none)\n"
        );
    }

    #[test]
    fn a_declared_module_without_a_file_is_an_error() {
        let dir = ScratchDir::new("module-graph");
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).expect("create src");
        std::fs::write(src.join("lib.rs"), "//! root\npub mod gone;\n").expect("write lib.rs");
        match ModuleGraph::read(&src, "t/src") {
            Err(ModuleGraphError::MissingModule { name, tried, .. }) => {
                assert_eq!(name, "gone");
                assert_eq!(tried.len(), 2);
            }
            other => panic!("expected MissingModule, got {other:?}"),
        }
    }
}
