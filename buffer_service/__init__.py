"""buffer-service: one LLM reply per burst of WhatsApp messages, buffered in Redis beside Chatwoot.

Where a message goes, in file order: `app` (webhook in) -> `chatwoot` (what to answer) ->
`store` + `lua/append.lua` (buffered, deadline set) -> `worker` (deadline passes, claimed by
`lua/claim.lua`) -> `processor` (prompt, `llm`, reply posted with `chatwoot`, `lua/finish.lua`).
"""

__version__ = "0.1.0"
