//! Host bindings of the three worlds of `sdk/wit/policy.wit`.

pub mod router {
    wasmtime::component::bindgen!({ path: "../sdk/wit", world: "router-policy" });
}

pub mod evictor {
    wasmtime::component::bindgen!({ path: "../sdk/wit", world: "evictor-policy" });
}

pub mod admission {
    wasmtime::component::bindgen!({ path: "../sdk/wit", world: "admission-policy" });
}
