//! The model's own chat template (`tokenizer.chat_template`), rendered with
//! minijinja. Templates are written for Python's Jinja2, so the pycompat layer
//! supplies the string methods they call (`.strip()`, `.startswith()`, ...).

use minijinja::{context, Environment, Error, ErrorKind};
use natter_shared::proto::ChatMessage;
use serde::Serialize;

/// Used when a GGUF carries no template: ChatML, the most common format.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    pub fn new(source: Option<String>, bos_token: String, eos_token: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.unwrap_or_else(|| CHATML.to_string()))
            .map_err(|e| format!("the model's chat template does not parse: {e}"))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// Renders the conversation followed by the assistant's turn opener.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let messages: Vec<TemplateMessage> =
            messages.iter().map(|m| TemplateMessage { role: m.role.as_str(), content: &m.content }).collect();
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| format!("cannot render the chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_shared::proto::Role;

    #[test]
    fn chatml_fallback_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::new(None, String::new(), String::new()).unwrap();
        let out = t
            .render(&[
                ChatMessage { role: Role::System, content: "be brief".into() },
                ChatMessage { role: Role::User, content: "hi".into() },
            ])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() }}";
        let t = ChatTemplate::new(Some(src.into()), String::new(), String::new()).unwrap();
        assert_eq!(t.render(&[ChatMessage { role: Role::User, content: "  x ".into() }]).unwrap(), "x");
        let err = t.render(&[ChatMessage { role: Role::System, content: "s".into() }]).unwrap_err();
        assert!(err.contains("first must be user"), "{err}");
    }
}
