"""Stand-in for ComfyUI's ``folder_paths`` (tests only). ``base_path`` is set by the tests to a
temporary folder laid out like ComfyUI's (models/embeddings, user, output, input)."""

import os

base_path = os.environ.get("DPAGG_STUB_COMFY_BASE", "/nonexistent-comfyui")


def get_folder_paths(folder_name):
    return [os.path.join(base_path, "models", folder_name)]


def get_user_directory():
    return os.path.join(base_path, "user")


def get_output_directory():
    return os.path.join(base_path, "output")


def get_input_directory():
    return os.path.join(base_path, "input")


def get_input_subfolders():
    root = get_input_directory()
    if not os.path.isdir(root):
        return []
    return [
        os.path.relpath(d, root).replace(os.sep, "/")
        for d, _, _ in os.walk(root)
        if os.path.relpath(d, root) != "."
    ]
