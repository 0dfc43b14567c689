//! Circles in a module graph: Tarjan's strongly connected components, a few of the simple
//! circles inside each, and the report that tells a developer which imports make them.

use std::fmt::Write as _;

use crate::scan::ModuleGraph;

/// The strongly connected components of more than one node, each sorted, in order of their
/// smallest node. With self-edges left out of the graph these are exactly its circles.
pub fn circles(succ: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut t = Tarjan {
        succ,
        index: vec![None; succ.len()],
        low: vec![0; succ.len()],
        on_stack: vec![false; succ.len()],
        stack: Vec::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in 0..succ.len() {
        if t.index[v].is_none() {
            t.connect(v);
        }
    }
    let mut found: Vec<Vec<usize>> = t.found.into_iter().filter(|c| c.len() > 1).collect();
    for c in &mut found {
        c.sort_unstable();
    }
    found.sort();
    found
}

struct Tarjan<'a> {
    succ: &'a [Vec<usize>],
    index: Vec<Option<usize>>,
    low: Vec<usize>,
    on_stack: Vec<bool>,
    stack: Vec<usize>,
    next: usize,
    found: Vec<Vec<usize>>,
}

impl Tarjan<'_> {
    /// Recursive: a crate has at most a few hundred modules.
    fn connect(&mut self, v: usize) {
        self.index[v] = Some(self.next);
        self.low[v] = self.next;
        self.next += 1;
        self.stack.push(v);
        self.on_stack[v] = true;
        for &w in &self.succ[v] {
            match self.index[w] {
                None => {
                    self.connect(w);
                    self.low[v] = self.low[v].min(self.low[w]);
                }
                Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(self.low[v]) == self.index[v] {
            let mut component = Vec::new();
            while let Some(w) = self.stack.pop() {
                self.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            self.found.push(component);
        }
    }
}

/// How many simple circles of a component the report shows.
const SHOWN_CIRCLES: usize = 12;
/// A bound on the search for them, so that a dense component cannot hang the test.
const SEARCH_STEPS: usize = 200_000;

/// Simple circles inside `component` (each starting at its smallest node), shortest first, at
/// most `limit`; the second value says whether there are more.
pub fn simple_circles(
    succ: &[Vec<usize>],
    component: &[usize],
    limit: usize,
) -> (Vec<Vec<usize>>, bool) {
    let mut search = CircleSearch {
        succ,
        component,
        path: Vec::new(),
        found: Vec::new(),
        steps: 0,
    };
    for &start in component {
        search.path.push(start);
        search.extend(start);
        search.path.pop();
    }
    let mut found = search.found;
    found.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    let more = found.len() > limit || search.steps >= SEARCH_STEPS;
    found.truncate(limit);
    (found, more)
}

struct CircleSearch<'a> {
    succ: &'a [Vec<usize>],
    component: &'a [usize],
    path: Vec<usize>,
    found: Vec<Vec<usize>>,
    steps: usize,
}

impl CircleSearch<'_> {
    /// Extends `path` (which starts at its smallest node) through larger nodes of the component.
    fn extend(&mut self, v: usize) {
        let start = self.path[0];
        for &w in &self.succ[v] {
            self.steps += 1;
            if self.steps >= SEARCH_STEPS {
                return;
            }
            if w == start {
                self.found.push(self.path.clone());
            } else if w > start && self.component.contains(&w) && !self.path.contains(&w) {
                self.path.push(w);
                self.extend(w);
                self.path.pop();
            }
        }
    }
}

/// The report for the circles of one crate: each circle's modules, some simple circles in it,
/// and every import between two of its modules with the file, line and path that make it.
pub fn report(crate_name: &str, graph: &ModuleGraph, found: &[Vec<usize>]) -> String {
    let succ = graph.successors();
    let name = |i: usize| graph.modules[i].name.as_str();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{crate_name}: {} circle(s) of module imports. Each is a group of module files that \
         import each other; break it by moving what both sides need into a module that imports \
         neither (an error.rs, a types module) or by passing a narrow handle instead.",
        found.len()
    );
    for (n, component) in found.iter().enumerate() {
        let members: Vec<&str> = component.iter().map(|&i| name(i)).collect();
        let _ = writeln!(
            out,
            "\n{crate_name} circle {} of {}: {} modules: {}",
            n + 1,
            found.len(),
            component.len(),
            members.join(", ")
        );
        let (shown, more) = simple_circles(&succ, component, SHOWN_CIRCLES);
        let _ = writeln!(out, "  for example:");
        for c in &shown {
            let mut line: Vec<&str> = c.iter().map(|&i| name(i)).collect();
            line.push(name(c[0]));
            let _ = writeln!(out, "    {}", line.join(" -> "));
        }
        if more {
            let _ = writeln!(out, "    (and more)");
        }
        let _ = writeln!(out, "  the imports inside it:");
        for (&(from, to), refs) in &graph.edges {
            if !component.contains(&from) || !component.contains(&to) {
                continue;
            }
            let _ = writeln!(out, "    {} -> {}", name(from), name(to));
            // Uses of imported names follow their `use`; list them only when there is no `use`.
            let (direct, via_import): (Vec<_>, Vec<_>) = refs.iter().partition(|r| !r.via_import);
            let listed = if direct.is_empty() {
                &via_import
            } else {
                &direct
            };
            for r in listed {
                let _ = writeln!(
                    out,
                    "      {}:{}  {}",
                    graph.modules[from].shown_path, r.line, r.text
                );
            }
            if !direct.is_empty() && !via_import.is_empty() {
                let lines: Vec<String> = via_import.iter().map(|r| r.line.to_string()).collect();
                let _ = writeln!(
                    out,
                    "      and {} use(s) of those names, at line(s) {}",
                    via_import.len(),
                    lines.join(", ")
                );
            }
        }
    }
    out
}
