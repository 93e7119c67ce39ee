//! Plugins built from `plugins/` by `host/build.rs` and embedded in the binary.
//!
//! The build script compiles the `plugins/` workspace for `wasm32-wasip2`
//! (release), copies every component to `$OUT_DIR/plugins/<name>.wasm` and
//! generates the [`PLUGINS`] table below, so examples and test fixtures are
//! always exactly the ones built from this checkout. A component is only
//! compiled (by wasmtime) when a task uses it; embedding costs binary size,
//! not start-up time.

/// What a built-in plugin is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginRole {
    /// A plugin meant to be read and run by users (`hello`, `cooperative`,
    /// `sleeper`, `wc`).
    Example,
    /// A plugin that exists to make the host misbehave in one specific way
    /// (`spin-loop`, `mem-hog`, …), used by the tests.
    Fixture,
}

/// One component built from `plugins/<name>/`.
#[derive(Debug)]
pub struct BuiltPlugin {
    /// The plugin's package name, which is also its directory under
    /// `plugins/` and its file name under [`PLUGIN_DIR`] (plus `.wasm`).
    pub name: &'static str,
    /// Whether it is an example or a test fixture.
    pub kind: PluginRole,
    /// The plugin's bytes: a WebAssembly component, or for the plugins
    /// `host/build.rs` builds for `wasm32-wasip1` a preview-1 core module.
    pub bytes: &'static [u8],
}

// Defines `PLUGINS: &[BuiltPlugin]` (sorted by name) and `PLUGIN_DIR: &str`
// (the absolute directory holding the same components as files).
include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

/// The built-in plugin called `name`, if there is one.
pub fn find(name: &str) -> Option<&'static BuiltPlugin> {
    PLUGINS.iter().find(|plugin| plugin.name == name)
}

/// Where the build put the component file of plugin `name`:
/// `PLUGIN_DIR/<name>.wasm`. The file exists for every plugin in [`PLUGINS`]
/// as long as the build directory does; the path is not checked.
pub fn path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(PLUGIN_DIR).join(format!("{name}.wasm"))
}
