//! InstructEdit (SPEC-editors §9): MEND's editor, trained on a mixture of tasks whose edit prompts
//! carry an instruction naming the task. The networks, update and checkpoint contents are MEND's;
//! the method name differs so that an instruction-trained editor is never used without its
//! instructions (or the reverse) by mistake. The instructions themselves are the data's
//! (`crate::data::instructions`): the editor sees wrapped prompts in training and in evaluation.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Tensor, Var};

use super::checkpoint::FromArchive;
use super::mend::{Mend, MendParams};
use super::trainer::TrainingHparams;
use super::{EditText, EditedWeight, FactorPass, Hypernet, Purpose};
use crate::error::Result;
use crate::model::{LowRankChange, Model};

/// InstructEdit as `eval` and `apply` build it.
pub type InstructEditFromArchive = FromArchive<InstructEdit>;

/// A MEND editor trained with instructions.
pub struct InstructEdit(pub Mend);

impl Hypernet for InstructEdit {
    const METHOD: &'static str = "InstructEdit";
    type Params = MendParams;

    /// EasyEdit's InstructEdit files are MEND files (`alg: MEND`, `*-instruct.yaml`).
    fn read_params(path: &Path) -> Result<MendParams> {
        Mend::read_params(path)
    }

    fn archive(params: &MendParams) -> Option<&str> {
        Mend::archive(params)
    }

    fn build(model: &Model, params: MendParams) -> Result<Self> {
        Ok(InstructEdit(Mend::build(model, params)?))
    }

    fn params(&self) -> &MendParams {
        self.0.params()
    }

    fn inner_params(params: &MendParams) -> &[String] {
        Mend::inner_params(params)
    }

    fn training_of(params: &MendParams) -> TrainingHparams {
        Mend::training_of(params)
    }

    fn weights(&self) -> &[EditedWeight] {
        self.0.weights()
    }

    fn vars(&self) -> Vec<Var> {
        self.0.vars()
    }

    fn updates(
        &mut self,
        texts: &[EditText],
        model: &Model,
        pass: &FactorPass,
        purpose: Purpose,
    ) -> Result<Vec<LowRankChange>> {
        Hypernet::updates(&mut self.0, texts, model, pass, purpose)
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Hypernet::tensors(&self.0)
    }

    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        Hypernet::load_tensors(&mut self.0, tensors)
    }
}
