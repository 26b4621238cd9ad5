"""Bridges between attnkit and other libraries.

    attnkit.integrations.transformers.register()   attn_implementation="attnkit"
                                                    in Hugging Face transformers

Each bridge lives in its own module and imports its library only when used,
so `import attnkit` never pulls in transformers.
"""
