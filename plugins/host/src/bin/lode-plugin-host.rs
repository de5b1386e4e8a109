//! The sandboxed child that loads and runs one plugin call; started by `lode_plugin_host`.

fn main() {
    lode_plugin_host::child::main()
}
