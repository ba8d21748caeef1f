using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>Qcow2Image's opens take QEMU's image locks: vmsnap and a running QEMU keep out of each other's way.</summary>
[Trait("Category", "Unit")]
public class QemuLockTests
{
    private static string[] Drive(string image, bool readOnly = false) =>
        ["-machine", "none", "-drive", $"file={image},if=none,id=d0,format=qcow2{(readOnly ? ",read-only=on" : "")}"];

    [QemuFact]
    public void A_running_qemu_keeps_vmsnap_from_changing_the_image()
    {
        using var dir = new TempDir();
        string image = dir.File("q.qcow2");
        Qemu.Create(image, 8 << 20);
        Tool.QemuImg("snapshot", "-c", "s", image);
        using var vm = QemuVm.Start(Drive(image), paused: true);
        string hash = Qemu.Hash(image);

        var e = Assert.Throws<ImageInUseException>(() => Qcow2Image.Open(image));
        Assert.Contains("in use", e.Message);
        Assert.Contains("QEMU", e.Message);
        Assert.Throws<ImageInUseException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Throws<ImageInUseException>(() => Qcow2Image.Create(image, 1 << 20));
        using (var shared = Qcow2Image.Open(image, new Qcow2OpenOptions { ForceShare = true }))
        {
            Assert.True(shared.IsReadOnly);
            Assert.Equal("s", Assert.Single(shared.Snapshots).Name);
            Assert.Throws<OperationRefusedException>(() => shared.CreateSnapshot("x"));
        }
        Assert.Equal(hash, Qemu.Hash(image));
        vm.Quit();
        using (var img = Qcow2Image.Open(image)) img.CreateSnapshot("after");   // free again once QEMU is gone
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void While_vmsnap_writes_an_image_qemu_cannot_open_it_for_writing()
    {
        using var dir = new TempDir();
        string image = dir.File("v.qcow2");
        Qemu.Create(image, 8 << 20);
        using (var img = Qcow2Image.Open(image))
        {
            img.Write(new byte[4096], 0);
            var e = Assert.Throws<QemuException>(() => QemuVm.Start(Drive(image), paused: true).Dispose());
            Assert.Contains("lock", e.Message);
            Tool.Result info = Tool.Run("qemu-img", ["info", image]);
            Assert.NotEqual(0, info.ExitCode);
            Assert.Contains("lock", info.Stderr);
            Assert.Equal(0, Tool.Run("qemu-img", ["info", "-U", image]).ExitCode);
        }
        // A read-only vmsnap open lets a read-only QEMU share the image, but not a writing one.
        using (var reading = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            using (var vm = QemuVm.Start(Drive(image, readOnly: true), paused: true)) vm.Quit();
            Assert.Throws<QemuException>(() => QemuVm.Start(Drive(image), paused: true).Dispose());
        }
        using (var vm = QemuVm.Start(Drive(image), paused: true)) vm.Quit();
    }

    [QemuFact]
    public void A_backing_file_is_locked_for_reading()
    {
        using var dir = new TempDir();
        string base_ = dir.File("base.qcow2"), overlay = dir.File("overlay.qcow2");
        Qemu.Create(base_, 8 << 20);
        Qemu.Create(overlay, 8 << 20, backing: "base.qcow2");
        using (var vm = QemuVm.Start(Drive(base_), paused: true))
        {
            // QEMU writes the base: opening the overlay (which reads the base) is refused.
            Assert.Throws<ImageInUseException>(() => Qcow2Image.Open(overlay, new Qcow2OpenOptions { ReadOnly = true }));
            vm.Quit();
        }
        using (var img = Qcow2Image.Open(overlay))
        {
            img.Write(new byte[512], 0);
            // vmsnap reads the base while it has the overlay open: QEMU cannot write the base meanwhile.
            Assert.Throws<QemuException>(() => QemuVm.Start(Drive(base_), paused: true).Dispose());
        }
    }
}
