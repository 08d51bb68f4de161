//! The `static` kind: one stored value, put on the request as the route's `inject` says
//! (header, query parameter or Basic password). Ready at once: no await, no allocation beyond
//! what `inject::apply` does.

use std::sync::Arc;

use super::{Applied, Apply, Credential, Outgoing};
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
        // Policy load already refuses a credential without an `inject` form; say it again in
        // this kind's words for routes built any other way.
        match route.inject() {
            Some(_) => Ok(()),
            None => Err("a static credential needs an `inject` form on the route".into()),
        }
    }

    fn tripwire_kind(&self) -> Option<tripwire::Kind> {
        self.format
    }

    fn apply<'a>(&'a self, out: Outgoing<'a>) -> Apply<'a> {
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
