//! MEMIT (Meng et al. 2023; SPEC-editors §4): a batch of facts written over several layers at
//! once, each layer solving a covariance-regularised least squares in f64.

use std::path::Path;

use super::rank_one::solve::memit_delta;
use super::rank_one::spread::{spread_edit, templates, MassParams, MassState};
use super::{Edit, EditCtx, Editor, Phases};
use crate::data::EditRequest;
use crate::error::{Error, Result};
use crate::model::Model;

pub struct Memit {
    params: MassParams,
    state: MassState,
}

impl Memit {
    pub fn from_yaml(path: &Path) -> Result<Self> {
        let params = MassParams::from_yaml(path)?;
        if params.nullspace_threshold.is_some() || params.l2.is_some() || params.p_loc.is_some() {
            return Err(Error::file(
                path,
                "fields P_loc, nullspace_threshold and L2 belong to AlphaEdit, not MEMIT",
            ));
        }
        Ok(Memit {
            params,
            state: MassState::default(),
        })
    }
}

impl Editor for Memit {
    fn name(&self) -> &'static str {
        "MEMIT"
    }

    fn max_batch(&self) -> usize {
        self.params.max_batch()
    }

    fn prepare(&mut self, model: &Model, ctx: &EditCtx) -> Result<()> {
        templates(model, &self.params, ctx)?;
        self.state.covariances(model, &self.params, ctx)?;
        Ok(())
    }

    fn apply(
        &mut self,
        model: &mut Model,
        requests: &[EditRequest],
        ctx: &EditCtx,
    ) -> Result<Edit> {
        let mut phases = Phases::default();
        let (facts, groups) = phases.time("templates", || {
            self.state.prepare(model, requests, &self.params, ctx)
        })?;
        let covariances = phases.time("statistics", || {
            self.state.covariances(model, &self.params, ctx)
        })?;
        let lambda = self.params.mom2_update_weight;
        let mut edit = spread_edit(
            model,
            &facts,
            &groups,
            &self.params,
            &mut |i, _, keys, resid| memit_delta(keys, resid, covariances.layer_owned(i)?, lambda),
        )?;
        edit.phases = phases.then(&edit.phases);
        Ok(edit)
    }
}
