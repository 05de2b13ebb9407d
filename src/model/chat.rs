//! Chat templates: the Jinja template a chat model ships with (GGUF `tokenizer.chat_template`,
//! `tokenizer_config.json` `chat_template`), rendered as `transformers`' `apply_chat_template`
//! renders it (trimmed blocks, Python string methods, `raise_exception`), for EasyEdit's
//! `use_chat_template`.

use minijinja::{context, Environment, ErrorKind};

use super::Model;
use crate::error::{Error, Result};

/// Renders `template` for one user message followed by the generation prompt.
pub fn render_user_turn(template: &str, user: &str, bos: &str, eos: &str) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    let bad = |e: minijinja::Error| Error::Invalid(format!("chat template: {e}"));
    env.add_template("chat", template).map_err(bad)?;
    env.get_template("chat")
        .map_err(bad)?
        .render(context! {
            messages => vec![context! { role => "user", content => user }],
            add_generation_prompt => true,
            bos_token => bos,
            eos_token => eos,
        })
        .map_err(bad)
}

impl Model {
    /// `prompt` as the user turn of the model's chat template, ready for the assistant's answer.
    pub fn apply_chat_template(&self, prompt: &str) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Invalid(
                "the model has no chat template (use_chat_template needs one in the GGUF metadata or tokenizer_config.json)".into(),
            )
        })?;
        let token = |id: Option<u32>| {
            id.and_then(|i| self.tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        render_user_turn(
            template,
            prompt,
            &token(self.spec.bos_id),
            &token(self.spec.eos_id),
        )
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }
}
