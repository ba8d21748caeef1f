using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Migration;

/// <summary>The QEMU harness itself: QMP, HMP, failures reported with QEMU's words.</summary>
[Trait("Category", "Unit")]
public class QemuVmTests
{
    [QemuFact]
    public void Qmp_and_hmp_commands_reach_a_running_qemu()
    {
        using var dir = new TempDir();
        using var vm = QemuVm.Start(QemuVm.MachineNone(dir.File("ram"), 16 << 20), paused: true);
        Assert.Equal("prelaunch", vm.Execute("query-status")?["status"]?.GetValue<string>());
        Assert.Equal("prelaunch", vm.ExecuteJson("{\"execute\": \"query-status\"}")?["status"]?.GetValue<string>());
        Assert.Contains("ram0", vm.Hmp("info ramblock"));
        var e = Assert.Throws<QemuException>(() => vm.Execute("no-such-command"));
        Assert.Contains("no-such-command", e.Message);
        vm.Quit();
        Assert.True(vm.HasExited);
    }

    [QemuFact]
    public void A_qemu_that_cannot_start_fails_with_its_own_error()
    {
        var e = Assert.Throws<QemuException>(() => QemuVm.Start(["-machine", "no-such-machine"]));
        Assert.Contains("no-such-machine", e.Message);
    }
}
