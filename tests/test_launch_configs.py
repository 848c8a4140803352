"""The accelerate configs, the SLURM batch script, and real CPU launches with both.

The training runs use the real `accelerate launch` on the CPU (gloo). The SLURM
tests run the batch script with `SLURM_*` variables set by the test, and the
two-node run replaces only `srun` and `scontrol` with small test programs that
start one `accelerate launch` per node on this machine.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

from conftest import make_image_folder, tiny_train_args

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "accelerate_configs"
SBATCH_SCRIPT = REPO_ROOT / "launch" / "slurm_multinode.sbatch"
BASH = shutil.which("bash") or "/bin/bash"
# The accelerate executable of the running interpreter's environment. The path is
# not resolved, because a venv's python is often a link to the base interpreter.
ACCELERATE_EXECUTABLE = Path(sys.executable).parent / "accelerate"
LAUNCH_MODULE = [sys.executable, "-m", "accelerate.commands.launch"]
# Upper bound for one training launch, so a hung rendezvous fails the test.
LAUNCH_TIMEOUT_S = 300

# file name: (distributed_type, mixed_precision, num_processes, use_cpu)
EXPECTED_CONFIGS = {
    "cpu.yaml": (DistributedType.NO, "no", 1, True),
    # MULTI_GPU with use_cpu: see the comment in the file for why not MULTI_CPU.
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, "no", 2, True),
    "single_gpu.yaml": (DistributedType.NO, "no", 1, False),
    "single_gpu_fp16.yaml": (DistributedType.NO, "fp16", 1, False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, "no", 8, False),
    "multi_gpu_bf16.yaml": (DistributedType.MULTI_GPU, "bf16", 8, False),
    "multi_node.yaml": (DistributedType.MULTI_GPU, "no", 16, False),
}


# --- accelerate configs ---


def test_config_directory_matches_expectations():
    assert sorted(path.name for path in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED_CONFIGS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_config_loads_with_expected_values(name):
    distributed_type, mixed_precision, num_processes, use_cpu = EXPECTED_CONFIGS[name]

    # load_config_from_file raises on keys that accelerate does not know.
    config = load_config_from_file(str(CONFIG_DIR / name))

    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == distributed_type
    assert config.mixed_precision == mixed_precision
    assert config.num_processes == num_processes
    assert config.use_cpu is use_cpu
    assert config.debug is False


@pytest.mark.parametrize("name", ["cpu_2proc.yaml", "multi_gpu.yaml", "multi_gpu_bf16.yaml"])
def test_single_machine_configs_pick_free_port(name):
    config = load_config_from_file(str(CONFIG_DIR / name))

    assert config.num_machines == 1
    assert config.machine_rank == 0
    # 0 makes accelerate choose a free port instead of 29500.
    assert config.main_process_port == 0


def test_multi_node_config_fill_in_values():
    config = load_config_from_file(str(CONFIG_DIR / "multi_node.yaml"))

    assert config.num_machines == 2
    assert config.machine_rank == 0
    assert config.num_processes % config.num_machines == 0
    assert config.main_process_ip == "REPLACE-WITH-MAIN-MACHINE-ADDRESS"
    assert config.main_process_port == 29500


# --- SLURM batch script ---


def test_sbatch_script_bash_syntax():
    result = subprocess.run([BASH, "-n", str(SBATCH_SCRIPT)], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr


def test_sbatch_header_requests_one_task_per_node():
    header = [line for line in SBATCH_SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]

    assert "#SBATCH --ntasks-per-node=1" in header
    assert any(line.startswith("#SBATCH --nodes=") for line in header)
    assert any(line.startswith("#SBATCH --gpus-per-node=") for line in header)
    assert any(line.startswith("#SBATCH --time=") for line in header)


def clean_environment(**variables: str) -> dict[str, str]:
    """Return os.environ without SLURM, accelerate and crop_accel settings, plus ``variables``."""
    prefixes = ("SLURM_", "ACCELERATE_", "CROP_ACCEL_")
    environment = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    environment.update(variables)
    return environment


def run_sbatch_dry_run(training_args: list[str], path: str, **variables: str) -> subprocess.CompletedProcess:
    """Run the batch script in dry-run mode with ``PATH`` and the given variables."""
    environment = clean_environment(CROP_ACCEL_DRY_RUN="1", PATH=path, **variables)
    return subprocess.run(
        [BASH, str(SBATCH_SCRIPT), *training_args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def printed_commands(stdout: str) -> list[list[str]]:
    """Split the dry run's non-comment lines into argument lists."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def split_launch_command(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Return the `accelerate launch` flags as a dict and the arguments after launch/train.py."""
    assert argv[:2] == ["accelerate", "launch"]
    script_index = argv.index("launch/train.py")
    launcher_args = argv[2:script_index]
    assert len(launcher_args) % 2 == 0, launcher_args
    flags = {}
    for name, value in zip(launcher_args[::2], launcher_args[1::2]):
        assert name.startswith("--"), name
        assert name not in flags, f"{name} given twice"
        flags[name] = value
    return flags, argv[script_index + 1 :]


# An empty directory as PATH hides any scontrol installed on the machine, so the
# script takes its built-in node list parser. Bash is started by absolute path.
@pytest.fixture
def path_without_scontrol(tmp_path: Path) -> str:
    empty_bin = tmp_path / "empty_bin"
    empty_bin.mkdir()
    return str(empty_bin)


TRAINING_ARGS = ["--data-dir", "/data/crop photos", "--epochs", "3", "--wandb-mode", "offline"]


def test_dry_run_single_node_command(path_without_scontrol):
    result = run_sbatch_dry_run(
        TRAINING_ARGS,
        path_without_scontrol,
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="gpu-a01",
        SLURM_GPUS_ON_NODE="4",
    )
    assert result.returncode == 0, result.stderr

    commands = printed_commands(result.stdout)
    assert len(commands) == 1
    flags, script_args = split_launch_command(commands[0])
    assert flags == {
        "--machine_rank": "0",
        "--config_file": "accelerate_configs/multi_node.yaml",
        "--num_machines": "1",
        "--num_processes": "4",
        "--main_process_ip": "gpu-a01",
        "--main_process_port": "29500",
    }
    # The path with a space survives the shell quoting as one argument.
    assert script_args == TRAINING_ARGS


def test_dry_run_command_parses_with_accelerate(path_without_scontrol):
    result = run_sbatch_dry_run(
        TRAINING_ARGS,
        path_without_scontrol,
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="gpu-a01",
        SLURM_GPUS_ON_NODE="4",
    )
    assert result.returncode == 0, result.stderr

    [command] = printed_commands(result.stdout)
    launch_args = launch_command_parser().parse_args(command[2:])

    assert launch_args.config_file == "accelerate_configs/multi_node.yaml"
    assert launch_args.num_machines == 1
    assert launch_args.num_processes == 4
    assert launch_args.machine_rank == 0
    assert launch_args.main_process_ip == "gpu-a01"
    assert launch_args.main_process_port == 29500
    assert launch_args.training_script == "launch/train.py"
    assert launch_args.training_script_args == TRAINING_ARGS


def test_dry_run_two_nodes_ranks_and_processes(path_without_scontrol):
    result = run_sbatch_dry_run(
        TRAINING_ARGS,
        path_without_scontrol,
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_GPUS_PER_NODE="h100:8",
        CROP_ACCEL_MAIN_PROCESS_PORT="31337",
        CROP_ACCEL_MIXED_PRECISION="bf16",
    )
    assert result.returncode == 0, result.stderr

    commands = printed_commands(result.stdout)
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        flags, script_args = split_launch_command(command)
        assert flags["--machine_rank"] == str(rank)
        assert flags["--num_machines"] == "2"
        assert flags["--num_processes"] == "16"
        assert flags["--main_process_ip"] == "gpu07"
        assert flags["--main_process_port"] == "31337"
        assert flags["--mixed_precision"] == "bf16"
        assert script_args == TRAINING_ARGS


@pytest.mark.parametrize(
    ("nodelist", "first_host"),
    [
        ("node5", "node5"),
        ("alpha,beta", "alpha"),
        ("gpu[07-09,12],cpu3", "gpu07"),
        ("gpu[3,5]", "gpu3"),
        ("rack[1-2]-n[01-04]", "rack1-n01"),
        ("n-[001-004]", "n-001"),
    ],
)
def test_dry_run_nodelist_fallback_first_host(path_without_scontrol, nodelist, first_host):
    result = run_sbatch_dry_run(
        ["--data-dir", "d"],
        path_without_scontrol,
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST=nodelist,
        CROP_ACCEL_GPUS_PER_NODE="1",
    )
    assert result.returncode == 0, result.stderr

    [command] = printed_commands(result.stdout)
    flags, _ = split_launch_command(command)
    assert flags["--main_process_ip"] == first_host


def write_fake_scontrol(bin_dir: Path, nodelist: str, hostnames: list[str]) -> None:
    """Write an scontrol that expands only ``nodelist`` to ``hostnames`` and fails on other calls."""
    script = bin_dir / "scontrol"
    lines = "\\n".join(hostnames)
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = show ] && [ "$2" = hostnames ] && [ "$3" = {shlex.quote(nodelist)} ]; then\n'
        f"    printf '{lines}\\n'\n"
        "    exit 0\n"
        "fi\n"
        'echo "unexpected scontrol call: $*" >&2\n'
        "exit 1\n"
    )
    script.chmod(0o755)


def test_dry_run_prefers_scontrol_hostnames(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake_scontrol(bin_dir, "gpu[07-08]", ["gpu07.cluster", "gpu08.cluster"])

    result = run_sbatch_dry_run(
        ["--data-dir", "d"],
        f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_GPUS_ON_NODE="2",
    )
    assert result.returncode == 0, result.stderr

    for command in printed_commands(result.stdout):
        flags, _ = split_launch_command(command)
        assert flags["--main_process_ip"] == "gpu07.cluster"


def test_dry_run_main_process_ip_override(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake_scontrol(bin_dir, "gpu[07-08]", ["gpu07.cluster", "gpu08.cluster"])

    result = run_sbatch_dry_run(
        ["--data-dir", "d"],
        f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_GPUS_ON_NODE="2",
        CROP_ACCEL_MAIN_PROCESS_IP="10.1.2.3",
    )
    assert result.returncode == 0, result.stderr

    for command in printed_commands(result.stdout):
        flags, _ = split_launch_command(command)
        assert flags["--main_process_ip"] == "10.1.2.3"


@pytest.mark.parametrize(
    ("gpu_variables", "expected_per_node"),
    [
        ({"SLURM_GPUS_PER_NODE": "4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
        ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "4"}, 2),
        ({"CROP_ACCEL_GPUS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "2"}, 3),
    ],
)
def test_dry_run_gpus_per_node_sources(path_without_scontrol, gpu_variables, expected_per_node):
    result = run_sbatch_dry_run(
        ["--data-dir", "d"], path_without_scontrol, SLURM_NNODES="3", SLURM_JOB_NODELIST="n[1-3]", **gpu_variables
    )
    assert result.returncode == 0, result.stderr

    commands = printed_commands(result.stdout)
    assert len(commands) == 3
    for command in commands:
        flags, _ = split_launch_command(command)
        assert flags["--num_processes"] == str(3 * expected_per_node)


def test_dry_run_custom_config_and_executable(path_without_scontrol):
    result = run_sbatch_dry_run(
        ["--data-dir", "d"],
        path_without_scontrol,
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="n1",
        SLURM_GPUS_ON_NODE="8",
        CROP_ACCEL_ACCELERATE_CONFIG="accelerate_configs/multi_gpu_bf16.yaml",
        CROP_ACCEL_ACCELERATE="accelerate",
    )
    assert result.returncode == 0, result.stderr

    [command] = printed_commands(result.stdout)
    flags, _ = split_launch_command(command)
    assert flags["--config_file"] == "accelerate_configs/multi_gpu_bf16.yaml"


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({}, "SLURM_NNODES and SLURM_JOB_NODELIST are not set"),
        ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}, "GPUs per node not found"),
        ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "two"}, "got 'two'"),
        ({"SLURM_NNODES": "0", "SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "1"}, "SLURM_NNODES must be"),
        (
            {"SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "1", "CROP_ACCEL_MAIN_PROCESS_PORT": "x"},
            "CROP_ACCEL_MAIN_PROCESS_PORT must be",
        ),
        (
            {"SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "1", "CROP_ACCEL_MIXED_PRECISION": "fp32"},
            "CROP_ACCEL_MIXED_PRECISION must be no, fp16 or bf16",
        ),
    ],
)
def test_dry_run_invalid_environment_rejected(path_without_scontrol, variables, message):
    result = run_sbatch_dry_run(["--data-dir", "d"], path_without_scontrol, **variables)

    assert result.returncode != 0
    assert message in result.stderr
    assert printed_commands(result.stdout) == []


# --- Training runs through accelerate launch ---


def run_in_process_group(command: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group and kill that group if it exceeds the timeout.

    accelerate and torchrun start child processes that a plain timeout would leave running.
    """
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command[:6]} did not finish within {LAUNCH_TIMEOUT_S} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def training_environment(**variables: str) -> dict[str, str]:
    # One thread per process, so that multi-process runs do not oversubscribe the CPU cores.
    return clean_environment(OMP_NUM_THREADS="1", WANDB_MODE="disabled", **variables)


def tiny_training_args(data_dir: Path, output_dir: Path) -> list[str]:
    return tiny_train_args(data_dir, output_dir, "--epochs", "1", "--wandb-mode", "disabled")

@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", num_classes=3, per_class=8, size=32)


def read_run_config(output_dir: Path) -> dict:
    return json.loads((output_dir / "config.json").read_text())


def test_cpu_config_fp16_request_trains_fp32(tiny_folder, tmp_path):
    output_dir = tmp_path / "run"
    command = [
        *LAUNCH_MODULE,
        "--config_file", "accelerate_configs/cpu.yaml",
        "--mixed_precision", "fp16",
        "launch/train.py",
        *tiny_training_args(tiny_folder, output_dir),
    ]

    result = run_in_process_group(command, training_environment())

    assert result.returncode == 0, result.stdout[-4000:]
    # Rich can wrap long log lines, so compare with whitespace collapsed.
    output = " ".join(result.stdout.split())
    assert "fp16 mixed precision needs a GPU" in output
    assert "--mixed_precision bf16" in output
    run_config = read_run_config(output_dir)
    assert run_config["num_processes"] == 1
    assert run_config["mixed_precision_requested"] == "fp16"
    assert run_config["mixed_precision"] == "no"
    assert run_config["global_batch_size"] == 4


def test_cpu_2proc_config_bf16_trains_two_ranks(tiny_folder, tmp_path):
    output_dir = tmp_path / "run"
    command = [
        *LAUNCH_MODULE,
        "--config_file", "accelerate_configs/cpu_2proc.yaml",
        "--mixed_precision", "bf16",
        "launch/train.py",
        *tiny_training_args(tiny_folder, output_dir),
    ]

    # As documented in cpu_2proc.yaml, the processes form one gloo group only in CPU mode.
    result = run_in_process_group(command, training_environment(ACCELERATE_USE_CPU="1"))

    assert result.returncode == 0, result.stdout[-4000:]
    run_config = read_run_config(output_dir)
    assert run_config["num_processes"] == 2
    assert run_config["mixed_precision_requested"] == "bf16"
    assert run_config["mixed_precision"] == "bf16"
    assert run_config["global_batch_size"] == 8


FAKE_SRUN = """\
#!{python}
# Test stand-in for srun: runs the command once per node, all on this machine,
# with SLURM_NODEID and SLURM_PROCID as SLURM sets them for one task per node.
import os, subprocess, sys
from pathlib import Path

arguments = sys.argv[1:]
options = []
while arguments and arguments[0].startswith("-"):
    options.append(arguments.pop(0))
nodes = int(next(option.split("=", 1)[1] for option in options if option.startswith("--nodes=")))
log_dir = Path(os.environ["FAKE_SRUN_LOG_DIR"])
(log_dir / "srun_options.txt").write_text("\\n".join(options))
processes = []
for node in range(nodes):
    environment = {{**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node)}}
    log = open(log_dir / f"node{{node}}.log", "w")
    processes.append(subprocess.Popen(arguments, env=environment, stdout=log, stderr=subprocess.STDOUT))
sys.exit(max(process.wait() for process in processes))
"""


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sbatch_two_nodes_train_over_loopback(tiny_folder, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    write_fake_scontrol(bin_dir, "loopback[0-1]", ["127.0.0.1", "127.0.0.1"])
    log_dir = tmp_path / "srun_logs"
    log_dir.mkdir()
    output_dir = tmp_path / "run"

    environment = training_environment(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_SRUN_LOG_DIR=str(log_dir),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="loopback[0-1]",
        SLURM_SUBMIT_DIR=str(REPO_ROOT),
        CROP_ACCEL_GPUS_PER_NODE="1",
        CROP_ACCEL_MAIN_PROCESS_PORT=str(free_local_port()),
        CROP_ACCEL_ACCELERATE=str(ACCELERATE_EXECUTABLE),
        # Two CPU "nodes": without CPU mode the processes would not join one gloo group.
        ACCELERATE_USE_CPU="1",
    )
    result = run_in_process_group(
        [BASH, str(SBATCH_SCRIPT), *tiny_training_args(tiny_folder, output_dir)], environment
    )

    node_logs = "\n".join(
        f"--- {path.name} ---\n{path.read_text()[-3000:]}" for path in sorted(log_dir.glob("node*.log"))
    )
    assert result.returncode == 0, result.stdout[-3000:] + node_logs
    srun_options = (log_dir / "srun_options.txt").read_text().splitlines()
    assert "--nodes=2" in srun_options
    assert "--ntasks-per-node=1" in srun_options
    assert "--kill-on-bad-exit=1" in srun_options
    # A world of two processes forms only when the two launches got machine ranks 0 and 1.
    run_config = read_run_config(output_dir)
    assert run_config["num_processes"] == 2
    assert run_config["mixed_precision"] == "no"
    assert run_config["global_batch_size"] == 8
