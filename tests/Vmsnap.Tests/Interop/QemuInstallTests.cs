namespace Vmsnap.Tests.Interop;

/// <summary>Both QEMU versions are there and each test's choice reaches the programs it starts.</summary>
public sealed class QemuInstallTests
{
    [Theory]
    [MemberData(nameof(QemuInstall.Versions), MemberType = typeof(QemuInstall))]
    public void Each_version_runs_its_own_programs(string version)
    {
        using var _ = QemuInstall.Use(version);
        foreach (string program in new[] { "qemu-img", "qemu-io", "qemu-system-x86_64" })
        {
            Tool.Result r = Tool.Run(program, ["--version"]);
            Assert.Equal(0, r.ExitCode);
            Assert.Contains($"version {version}.", r.Stdout);
        }
        // The machine types the tests use exist in this version.
        string machines = Tool.Check("qemu-system-x86_64", "-machine", "help");
        Assert.Contains(QemuInstall.Current.PcMachine, machines);
        Assert.Contains(QemuInstall.Current.Q35Machine, machines);
    }

    [Fact]
    public async Task A_choice_follows_the_test_into_its_tasks_and_ends_with_it()
    {
        using (QemuInstall.Use("10.0"))
        {
            string inTask = await Task.Run(() => Tool.Find("qemu-img"));
            Assert.Contains("qemu-10.0", inTask);
        }
        // Once the choice ends, nothing is chosen: a QEMU program is refused, not quietly taken from 7.2.
        Assert.Throws<InvalidOperationException>(() => Tool.Find("qemu-img"));
    }
}
