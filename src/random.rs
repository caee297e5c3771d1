//! Operating-system randomness without a dependency, for the layers that need it: the store's
//! temporary names and the drivers' endpoint keys.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// 64 bits of operating-system randomness: std keys each `RandomState` from the OS (once per
/// process, then varied), and the time and process id are mixed in.
pub(crate) fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// 128 bits for an endpoint's key (`EndpointConfig::seed`): two draws of `random_u64`, whose
/// keys the standard library takes from the operating system's generator (getrandom on Linux).
/// [`Server::bind`](crate::Server::bind) and [`Client`](crate::Client) use it; a game that
/// builds its own [`Endpoint`](crate::Endpoint) puts it into the config's `seed`.
pub fn random_seed() -> u128 {
    (u128::from(random_u64()) << 64) | u128::from(random_u64())
}
