"""The prompt registry: git-versioned Jinja2 templates, stable/canary tags, an eval gate, rollback, pinning.

A registry is a directory in a git repository::

    prompts/
      tags.yaml                 # name -> {stable: v3, canary: v4, canary_weight: 10}
      support-chat/
        v3.jinja2, v4.jinja2    # templates (a system message, or a whole chat)
        prompt.yaml             # typed variables, certified models per version, eval suite path
        evals/support-chat.yaml # cases and assertions

The gateway uses one small interface: ``Registry.resolve`` and ``Registry.render`` (``tureen.prompts.registry``).
"""

from tureen.prompts.registry import PromptError, Registry, Resolved, load_registry

__all__ = ["PromptError", "Registry", "Resolved", "load_registry"]
