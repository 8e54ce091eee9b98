import subprocess
import sys


def test_store_imports_no_torch_grpc_or_server(tmp_path):
    code = (
        "import sys, loraplex.adapters_store, loraplex.adapters_store.store;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc')"
        " or m.startswith('loraplex.server')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]"
