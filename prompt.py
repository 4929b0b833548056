"""The release's prompt module: `REAL_NAME` and the prompt lists (logic lives in mvfa.method.prompts)."""
from mvfa.method.prompts import ABNORMAL_STATES, NORMAL_STATES, REAL_NAME, TEMPLATES

# The release's list names.
prompt_normal = list(NORMAL_STATES)
prompt_abnormal = list(ABNORMAL_STATES)
prompt_templates = list(TEMPLATES)

__all__ = ["REAL_NAME", "prompt_normal", "prompt_abnormal", "prompt_templates"]
