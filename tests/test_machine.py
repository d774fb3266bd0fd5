"""What CPU a figure was measured on: the INT8-relevant extensions, read from /proc/cpuinfo."""

from __future__ import annotations

from stagewise.machine import INT8_FEATURES, cpu_record, cpu_summary, cpuinfo, family


def test_families_and_this_cpu():
    assert family("x86_64") == family("AMD64") == "x86" and family("aarch64") == family("arm64") == "arm"
    cpu = cpu_record()
    known = {name for table in INT8_FEATURES.values() for _, name in table}
    assert set(cpu["features"]) <= known and len(cpu["flags"]) == len(cpu["features"])
    assert cpu["model"] in cpu_summary() and str(cpu["cores"]) in cpu_summary()


def test_cpuinfo_of_an_x86_and_an_arm_machine(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\n"
                   "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold\nflags\t\t: fpu\n")
    assert cpuinfo(x86) == ("Intel(R) Xeon(R) Gold", {"fpu", "avx2", "avx512f", "avx512_vnni"})
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd asimddp i8mm\nCPU part\t: 0xd0c\n")
    assert cpuinfo(arm) == ("", {"fp", "asimd", "asimddp", "i8mm"})
    assert cpuinfo(tmp_path / "missing") == ("", set())
