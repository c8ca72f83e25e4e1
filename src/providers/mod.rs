//! Per-kind request and response adapters. `openai` and `azure` providers
//! speak the OpenAI wire format (Azure differs only in URL and key header,
//! handled where the upstream request is built); [`anthropic`] translates
//! to and from the Anthropic Messages API.

pub mod anthropic;
