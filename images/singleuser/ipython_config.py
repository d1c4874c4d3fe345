# labfleet notebook image: every IPython kernel has the %%batch cell magic.
c = get_config()  # noqa: F821
c.InteractiveShellApp.extensions = ["labfleet_batch.client"]
