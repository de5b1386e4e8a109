#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lode_fuzz::plugin_wire(data));
