//! The `static` kind: one stored value, put on the request as the route's `inject` says
//! (header, query parameter or Basic password). Ready at once: no await, no allocation beyond
//! what `inject::apply` does.

use std::sync::Arc;

use super::{Applied, Apply, Credential, Outgoing};
use crate::deny::Deny;
use crate::inject;
use crate::policy::Route;
use crate::secrets::Secret;
use crate::tripwire;

/// A static credential: its value, and the format family the value belongs to (computed once).
pub struct Fixed {
    value: Arc<Secret>,
    format: Option<tripwire::Kind>,
}

impl Fixed {
    /// The credential whose value is `value`.
    pub fn new(value: Arc<Secret>) -> Fixed {
        let format = tripwire::kind_of(value.expose());
        Fixed { value, format }
    }
}

impl Credential for Fixed {
    fn kind(&self) -> &'static str {
        "static"
    }

    fn fits(&self, route: &Route) -> Result<(), String> {
        // Policy load accepts a credential without `inject` (signing kinds need none);
        // `policy check` asks here, and `apply` refuses such a route per request.
        match route.inject() {
            Some(_) => Ok(()),
            None => Err("a static credential needs an `inject` form on the route".into()),
        }
    }

    fn tripwire_kind(&self) -> Option<tripwire::Kind> {
        self.format
    }

    fn apply<'a>(&'a self, out: Outgoing<'a>) -> Apply<'a> {
        if out.rewrite.allowed.route().inject().is_none() {
            // SECURITY: never forward a credentialed route's request with nothing on it
            // silently: say which credential cannot be used and why.
            return Apply::ready(Err(Deny::CredentialUnavailable(format!(
                "{}: a static credential needs an `inject` form on route {}",
                out.rewrite.allowed.route().credential().unwrap_or("?"),
                out.rewrite.allowed.route().id()
            ))));
        }
        let result = inject::apply(
            out.parts,
            out.rewrite,
            Some(self.value.clone()),
            out.prepared,
        )
        .map(|injected| Applied {
            body: out.body,
            needles: injected.needles,
            detail: None,
        });
        Apply::ready(result)
    }
}
